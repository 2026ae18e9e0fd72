"""An NVEmbed as an MTEB model: `mteb.evaluate(to_mteb(NVEmbed.load(path)), tasks)`.

Paper: NV-Embed is scored on MTEB (Table 1), with the task's instruction on queries only (PAPER.md
section 3). `to_mteb` wraps a model in mteb's encoder interface
(`mteb.models.abs_encoder.AbsEncoder`, mteb 2.x) with its metadata: a name, the weights' fingerprint
as the revision (mteb caches results by name and revision, so other weights under the same name are
not answered from the cache), and dot-product similarity (`NVEmbed.encode` returns unit vectors in
fp32, so this is the cosine that evaluate.py's search ranks by). mteb's retrieval tasks leave
`ignore_identical_ids` off unless a task sets it, where evaluate.py follows BEIR (on): pass the
task's setting to `run_evaluation` to compare the two. Run:
    import mteb; from model import NVEmbed; from mteb_model import to_mteb
    mteb.evaluate(to_mteb(NVEmbed.load("runs/stage2/model")), mteb.get_tasks(tasks=["SciFact"]))
Test: python -m pytest -q tests/test_mteb.py (skips without mteb).
"""

from plumbing.builtin import BUILTIN_INSTRUCTION
from evaluate import INSTRUCTIONS

# Instructions of this project, by task name in lower case, for tasks whose metadata gives none.
KNOWN_INSTRUCTIONS = {**INSTRUCTIONS, "builtin": BUILTIN_INSTRUCTION}


def task_instruction(task_metadata, prompt_type) -> str:
    """The instruction for one side of a task: `prompt_type` "query", "document" or None (a task
    whose texts all play the same part: STS, clustering, classification). The task's own `prompt` (a
    str: the queries'; a dict: per side, {"query": ..., "document": ...} for a symmetric retrieval
    task), else this project's for the task's name, else mteb's default for the task's kind.
    Documents get one only from a dict that names them (PAPER.md section 3)."""
    side = getattr(prompt_type, "value", prompt_type)  # mteb's PromptType is a str enum
    prompt = task_metadata.prompt
    if isinstance(prompt, dict):
        return prompt.get(side or "query") or ""
    if side == "document":
        return ""
    if prompt:
        return prompt
    if task_metadata.name.lower() in KNOWN_INSTRUCTIONS:
        return KNOWN_INSTRUCTIONS[task_metadata.name.lower()]
    # e.g. retrieval: "Retrieve text based on user query."
    from mteb.abstasks.abstask import get_abstask_prompt
    return get_abstask_prompt(task_metadata.name)


def to_mteb(model, name: str | None = None):
    """`model` (an NVEmbed) as an mteb encoder. `name` defaults to the model's own, put under
    "nv-embed/" when it has no organisation (mteb requires "organization/model_name"). The revision
    is the fingerprint of the weights now: wrap again after further training."""
    # mteb is an optional, heavy dependency (an evaluation framework with many packages of its own):
    # imported here, so that this file and the rest of the project import without it.
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    name = name or model.name or "unnamed"
    meta = ModelMeta(
        loader=None, name=name if "/" in name else f"nv-embed/{name}", revision=model.fingerprint(),
        release_date=None, languages=None, n_parameters=sum(p.numel() for p in model.parameters()),
        memory_usage_mb=None, max_tokens=model.max_length,
        embed_dim=model.decoder.config.hidden_size,
        license=None, open_weights=None, public_training_code=None, public_training_data=None,
        framework=["PyTorch"], similarity_fn_name=ScoringFunction.DOT_PRODUCT,
        use_instructions=True,
        training_datasets=None,
    )

    class NVEmbedEncoder(AbsEncoder):
        mteb_model_meta = meta

        def __init__(self):
            self.model = model

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None,
                   batch_size=32, show_progress_bar=False, **kwargs):
            """mteb's batches (dicts with a "text" list) -> (N, D) float32 numpy, encoded in one
            call as evaluate.run_evaluation does (the same batches by length, so the same
            numbers)."""
            precision = kwargs.pop("precision", "float32")
            if precision != "float32":
                raise ValueError(f"to_mteb: precision {precision!r} is not supported; NVEmbed "
                                 "gives float32")
            texts = [text for batch in inputs for text in batch["text"]]
            return model.encode(texts, instruction=task_instruction(task_metadata, prompt_type),
                                batch_size=batch_size, show_progress_bar=show_progress_bar)

    return NVEmbedEncoder()
