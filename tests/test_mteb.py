"""mteb_model.to_mteb against the real mteb package: a local BEIR folder run as an mteb retrieval
task scores as evaluate.run_evaluation does; the model's metadata; which side gets which
instruction."""

import os

import pytest

mteb = pytest.importorskip("mteb", reason="mteb is an optional dependency (pip install -e "
                                          "'.[mteb]') that this test checks the adapter against; "
                                          "not in the dev extra")
from datasets import Dataset  # noqa: E402  (after the skip: mteb brings datasets' use here)
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.cache import ResultCache  # noqa: E402
from mteb.models.model_meta import ScoringFunction  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from plumbing.builtin import BUILTIN_INSTRUCTION, builtin_dataset  # noqa: E402
from plumbing.datafiles import load_beir, write_beir  # noqa: E402
from evaluate import run_evaluation  # noqa: E402
from plumbing.mteb_model import task_instruction, to_mteb  # noqa: E402
from plumbing.loading import from_base  # noqa: E402


def local_metadata(name, prompt=None, task_type="Retrieval"):
    """TaskMetadata of a task read from local files (nothing to download: the dataset path is never
    opened)."""
    return TaskMetadata(
        name=name, description="A BEIR folder on local disk.", reference=None, type=task_type,
        category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score="ndcg_at_10", dataset={"path": "local", "revision": "local"}, date=None,
        domains=None, task_subtypes=None, license=None, annotations_creators=None, dialect=None,
        sample_creation=None, bibtex_citation="", prompt=prompt,
    )


def beir_task(folder, split, name):
    """An mteb retrieval task over a BEIR folder, read with the project's own reader
    (datafiles.load_beir)."""

    class LocalBEIRRetrieval(AbsTaskRetrieval):
        metadata = local_metadata(name)

        def load_data(self, num_proc=None, **kwargs):
            corpus, queries, qrels = load_beir(folder, split)
            self.dataset = {"default": {split: dict(
                corpus=Dataset.from_list([{"id": did, "title": doc["title"], "text": doc["text"]}
                                          for did, doc in corpus.items()]),
                queries=Dataset.from_list([{"id": qid, "text": text}
                                           for qid, text in queries.items()]),
                relevant_docs=qrels, top_ranked=None)}}
            self.data_loaded = True

    return LocalBEIRRetrieval()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and no shared cache: huggingface_hub reads HF_HUB_OFFLINE when imported, so set
    both."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "mteb-cache"))


def test_mteb_scores_a_local_beir_task_as_evaluate_does(tmp_path, offline):
    # The built-in test split's 100 queries over their 100 relevant documents and 150 others (time:
    # encoding), as a BEIR folder; half the documents get a title (their first word), so mteb's
    # title + text join is checked against datafiles.doc_text's.
    corpus, queries, qrels = builtin_dataset().split("test")
    relevant = {doc_id for judged in qrels.values() for doc_id in judged}
    kept = sorted(relevant) + [doc_id for doc_id in corpus if doc_id not in relevant][:150]
    corpus = {doc_id: corpus[doc_id] for doc_id in kept}
    for index, (doc_id, doc) in enumerate(corpus.items()):
        if index % 2 == 0:
            title, text = doc["text"].split(" ", 1)
            corpus[doc_id] = {"title": title, "text": text}
    write_beir(tmp_path / "builtin", corpus, queries, {"test": qrels})
    model = from_base("tiny", pooling="mean")  # random weights: low but not degenerate scores
    # instruction: the project's for "builtin"
    task = beir_task(tmp_path / "builtin", "test", name="builtin")

    result = mteb.evaluate(to_mteb(model), task, cache=ResultCache(tmp_path / "results"),
                           show_progress_bar=False, encode_kwargs={"batch_size": 32})
    scores = result.task_results[0].scores["test"][0]

    corpus, queries, qrels = load_beir(tmp_path / "builtin", "test")
    ours, _ = run_evaluation(model, corpus, queries, qrels, instruction=BUILTIN_INSTRUCTION,
                             # mteb's retrieval default: off
                             ignore_identical_ids=task.ignore_identical_ids)
    bare, _ = run_evaluation(model, corpus, queries, qrels, instruction="",
                             ignore_identical_ids=task.ignore_identical_ids)
    assert 0.01 < ours["NDCG@10"] < 0.5, ours["NDCG@10"]
    # The instruction moves the score, so equality below shows mteb's queries got it and its
    # documents did not.
    assert round(bare["NDCG@10"], 5) != round(ours["NDCG@10"], 5)
    for k in (1, 10, 100):  # mteb rounds to 5 decimals
        assert scores[f"ndcg_at_{k}"] == pytest.approx(round(ours[f"NDCG@{k}"], 5), abs=1e-9), k
        assert scores[f"recall_at_{k}"] == pytest.approx(round(ours[f"Recall@{k}"], 5), abs=1e-9), k
        assert scores[f"map_at_{k}"] == pytest.approx(round(ours[f"MAP@{k}"], 5), abs=1e-9), k
    assert (tmp_path / "results").is_dir() and \
        not os.path.exists(os.path.expanduser("~/.cache/mteb/nv-embed"))


def test_metadata_names_the_weights_and_dot_product():
    model = from_base("tiny", pooling="mean")
    meta = to_mteb(model).mteb_model_meta
    assert meta.name == "nv-embed/tiny"
    assert meta.revision == model.fingerprint()
    assert meta.similarity_fn_name is ScoringFunction.DOT_PRODUCT
    assert meta.embed_dim == model.decoder.config.hidden_size
    assert to_mteb(model, name="me/run7").mteb_model_meta.name == "me/run7"
    other = from_base("tiny", pooling="mean", seed=1)
    # other weights, other cache entry
    assert to_mteb(other).mteb_model_meta.revision != meta.revision


def test_instruction_per_side():
    retrieval = local_metadata("MyTask", prompt="Find the answer")
    assert task_instruction(retrieval, PromptType.query) == "Find the answer"
    # documents bare (PAPER.md section 3)
    assert task_instruction(retrieval, PromptType.document) == ""
    symmetric = local_metadata("MyTask", prompt={"query": "Find a duplicate",
                                                 "document": "Find a duplicate"})
    assert task_instruction(symmetric, PromptType.document) == "Find a duplicate"
    queries_only = local_metadata("MyTask", prompt={"query": "Find the answer"})
    assert task_instruction(queries_only, PromptType.document) == ""
    # No prompt: the project's instruction for a known name (evaluate.INSTRUCTIONS), else mteb's
    # default for the kind.
    assert task_instruction(local_metadata("SciFact"),
                            PromptType.query).startswith("Given a scientific claim")
    # a task class of mteb's retrieval kind
    unknown = beir_task("unused", "test", name="MyLocalRetrieval").metadata
    assert task_instruction(unknown, PromptType.query) == "Retrieve text based on user query."
    # A task without sides (STS) puts its instruction on every text.
    sts = local_metadata("MySTS", prompt="Retrieve semantically similar text", task_type="STS")
    assert task_instruction(sts, None) == "Retrieve semantically similar text"
