"""The built-in synthetic dataset for the default run and the tests; not part of the method, read
when you need it.

Made-up places described by four facets (type, region, adjective, type-specific trait), each written
with one of `num_forms` synonyms (the tables hold four per facet). A query names the same four
facets, each in the document's own form with probability `same_form_probability` and otherwise in
another synonym, never the place's name: string matching gets only partial help and a model has to
learn the synonym table. All 5 x 4 x 5 x 5 = 500 combinations exist once, so every query has exactly
one relevant document; hard negatives are training places of the same type that differ in the fewest
facets. Test queries ask about held-out places (never a training positive or negative) in the same
vocabulary, so what is learned transfers.

Difficulty, test nDCG@10, defaults (2 forms, same form 1 in 2): untrained byte model 0.04, TF-IDF
0.37; a 2-layer, 128-wide byte transformer from scratch (mean pooling, 16 queries x (1 + 3)
documents per step, 1 CPU thread) 0.16 after 1 minute, 0.36 after 2.5, 0.43 after 5. 4 forms, same
form 1 in 4: TF-IDF 0.22, the same model 0.13 after 4 min.

Run: `python -m plumbing.builtin OUT_DIR [--seed N]` writes it (BEIR folder plus train.jsonl).
Tests: tests/test_data.py.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import data
from plumbing.datafiles import write_beir
from plumbing.errors import exits_on_user_error
from plumbing.training_files import Example, write_training_file

BUILTIN_INSTRUCTION = "Given a question, retrieve the passage that answers it"
BUILTIN_TYPES = {
    "river": ["river", "stream", "waterway", "creek"],
    "mountain": ["mountain", "peak", "summit", "high crag"],
    "town": ["town", "village", "settlement", "hamlet"],
    "forest": ["forest", "woodland", "grove", "wildwood"],
    "lake": ["lake", "pond", "mere", "tarn"],
}
BUILTIN_REGIONS = {
    "north": ["in the north", "up north", "in the polar region", "near the arctic"],
    "south": ["in the south", "down south", "in the tropics", "near the equator"],
    "east": ["in the east", "toward sunrise", "in the orient lands", "by the dawn coast"],
    "west": ["in the west", "toward sunset", "in the occident", "by the dusk coast"],
}
BUILTIN_ADJECTIVES = {
    "big": ["huge", "vast", "enormous", "immense"], "small": ["tiny", "small", "little", "petite"],
    "old": ["ancient", "age-old", "primeval", "very old"],
    "dark": ["dark", "gloomy", "shadowy", "dim"],
    "famous": ["famous", "renowned", "celebrated", "well-known"],
}
BUILTIN_TRAITS = {  # clauses that read after "it" and after "that"
    "river": {
        "floods": ["floods in spring", "overflows after the thaw", "bursts its banks yearly",
                   "swells when snow melts"],
        "cold": ["has icy water", "runs freezing cold", "is bitterly chilly",
                 "carries frigid water"],
        "fish": ["teems with fish", "is full of trout", "is rich in fish", "holds many salmon"],
        "fast": ["flows very fast", "has a rapid current", "rushes swiftly", "races downhill"],
        "muddy": ["is muddy", "carries brown silt", "looks murky", "is thick with mud"],
    },
    "mountain": {
        "snowy": ["is capped with snow", "has a white top", "wears a frosty crown",
                  "is covered in snow"],
        "volcano": ["is a volcano", "spits lava", "erupts now and then", "smokes and rumbles"],
        "steep": ["is very steep", "has sheer cliffs", "rises almost vertically",
                  "is hard to climb"],
        "caves": ["hides many caves", "is riddled with tunnels", "has deep caverns",
                  "is full of grottos"],
        "windy": ["is always windy", "is battered by gales", "has howling winds",
                  "is swept by storms"],
    },
    "town": {
        "market": ["holds a weekly market", "has a busy bazaar", "lives from trading",
                   "hosts a big fair"],
        "bridge": ["has a stone bridge", "is proud of its bridge", "sits at an old crossing",
                   "grew around a viaduct"],
        "bread": ["is full of bakers", "smells of fresh bread", "bakes fine pastries",
                  "sells the best loaves"],
        "walls": ["has high walls", "is fortified", "sits behind ramparts",
                  "is ringed by battlements"],
        "fishing": ["lives from fishing", "has a fishing harbor", "is a port for boats",
                    "sends boats to sea"],
    },
    "forest": {
        "pines": ["is full of pines", "grows tall conifers", "is thick with fir trees",
                  "smells of resin"],
        "wolves": ["is home to wolves", "echoes with wolf howls", "shelters wolf packs",
                   "hides a wolf den"],
        "mushrooms": ["is rich in mushrooms", "grows many fungi", "is full of toadstools",
                      "yields wild mushrooms"],
        "burned": ["burned last summer", "was scorched by fire", "shows charred trunks",
                   "survived a wildfire"],
        "haunted": ["is said to be haunted", "is full of ghosts", "scares travelers at night",
                    "is cursed by legend"],
    },
    "lake": {
        "deep": ["is very deep", "has no known bottom", "plunges far down", "is bottomless"],
        "salty": ["has salty water", "is briny", "tastes of salt", "is saline"],
        "frozen": ["freezes every winter", "ices over in winter", "turns to ice when cold",
                   "is frozen half the year"],
        "clear": ["has clear water", "is crystal clear", "is transparent to the bed",
                  "has see-through water"],
        "swans": ["is home to swans", "hosts graceful waterbirds", "has nesting cygnets",
                  "shelters many swans"],
    },
}
_NAME_SYLLABLES = ["zor", "vath", "kel", "mir", "dun", "ash", "bel", "tor", "quin", "ral", "syl",
                   "dra", "nok", "fen", "gar", "lo", "thi", "ur", "ven", "mo", "pel", "rin", "sa",
                   "hul", "ix", "ere", "vo", "tam"]
_DOC_TEMPLATES = ["{Name} is {a} {adjective} {type} {region}; it {trait}.",
                  "{Name}, {a} {adjective} {type} {region}, {trait}.",
                  "{Region}, the {adjective} {type} {Name} {trait}."]
_QUERY_TEMPLATES = ["which {adjective} {type} {region} {trait}?",
                    "what {adjective} {type} {region} {trait}?",
                    "name the {adjective} {type} {region} that {trait}",
                    "find the {adjective} {type} {region} "
                    "that {trait}", "is there {a} {adjective} {type} {region} that {trait}?"]


@dataclass
class BuiltinDataset:
    """The built-in data: BEIR-form corpus, queries (all splits) and qrels per split, plus training
    examples."""

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]]
    train_examples: list[Example]
    instruction: str = BUILTIN_INSTRUCTION

    def split(self, name: str):
        """What load_beir(folder, name) returns for this data written with write_beir."""
        qrels = self.qrels[name]
        return self.corpus, {q: self.queries[q] for q in qrels}, qrels


def builtin_dataset(seed: int = 0, num_test: int = 100, queries_per_train_document: int = 4,
                    num_hard_negatives: int = 7, num_forms: int = 2,
                    same_form_probability: float = 0.5) -> BuiltinDataset:
    """The built-in dataset (module docstring): 500 documents, num_test test queries (one per
    held-out document) and queries_per_train_document differently worded queries for each of the
    other documents. num_forms (2..4) synonyms of each facet are used; fewer is easier."""
    if not 2 <= num_forms <= 4:
        raise ValueError(f"num_forms must be 2, 3 or 4, got {num_forms}")
    rng = random.Random(seed)
    combos = [(kind, region, adjective, trait) for kind in BUILTIN_TYPES
              for region in BUILTIN_REGIONS for adjective in BUILTIN_ADJECTIVES
              for trait in BUILTIN_TRAITS[kind]]
    rng.shuffle(combos)
    # the shuffle makes the last num_test a random sample
    test = set(range(len(combos) - num_test, len(combos)))

    def words(combo, form_indices):
        kind, region, adjective, trait = combo
        tables = (BUILTIN_TYPES[kind], BUILTIN_REGIONS[region], BUILTIN_ADJECTIVES[adjective],
                  BUILTIN_TRAITS[kind][trait])
        type_, region_, adjective_, trait_ = (table[f] for table, f in zip(tables, form_indices))
        return dict(type=type_, region=region_, Region=region_[0].upper() + region_[1:],
                    adjective=adjective_, a="an" if adjective_[0] in "aeiou" else "a", trait=trait_)

    names: set[str] = set()
    corpus, queries, qrels = {}, {}, {"train": {}, "test": {}}
    for i, combo in enumerate(combos):
        while (name := "".join(rng.choice(_NAME_SYLLABLES)
                               for _ in range(rng.choice((2, 3)))).title()) in names:
            pass
        names.add(name)
        doc_id, split = f"doc{i:03d}", "test" if i in test else "train"
        doc_forms = [rng.randrange(num_forms) for _ in range(4)]
        corpus[doc_id] = {"title": "", "text": rng.choice(_DOC_TEMPLATES).format(
            Name=name, **words(combo, doc_forms))}
        for k in range(1 if split == "test" else queries_per_train_document):
            # Each facet: usually another synonym, sometimes the document's own word (partial
            # lexical overlap).
            query_forms = [f if rng.random() < same_form_probability
                           else rng.choice([g for g in range(num_forms) if g != f])
                           for f in doc_forms]
            query_id = f"q{i:03d}" if split == "test" else f"q{i:03d}-{k}"
            queries[query_id] = rng.choice(_QUERY_TEMPLATES).format(**words(combo, query_forms))
            qrels[split][query_id] = {doc_id: 1}

    # Hard negatives: training places of the same type, fewest differing facets first (ties in
    # random order).
    train_ids = [i for i in range(len(combos)) if i not in test]
    examples = []
    for query_id, judged in qrels["train"].items():
        (doc_id,) = judged
        i = int(doc_id[3:])
        same_type = [j for j in train_ids if j != i and combos[j][0] == combos[i][0]]
        distance = {j: sum(a != b for a, b in zip(combos[i], combos[j])) for j in same_type}
        ranked = [f"doc{j:03d}"
                  for j in sorted(same_type, key=lambda j: (distance[j], rng.random()))]
        ranked = ranked[:num_hard_negatives]
        examples.append(Example(queries[query_id], BUILTIN_INSTRUCTION, corpus[doc_id]["text"],
                                [corpus[j]["text"] for j in ranked], "retrieval", query_id, doc_id,
                                ranked))
    return BuiltinDataset(corpus, queries, qrels, examples)


BUILTIN_TYPE_INSTRUCTION = "Classify the kind of place a passage describes"


def builtin_sources(stage: int, hard_negatives: int, in_batch_negatives: bool,
                    seed: int = 0) -> list:
    """The built-in training data (`builtin_dataset`) for the tiny default job.

    Stage 1: its retrieval examples. Stage 2: the same retrieval examples blended with a
    non-retrieval task made from the training documents, example-based classification by
    kind of place (river, town, ...; PAPER.md section 4, v2 pairs: the positive is another
    place of the same kind, the negatives places of other kinds). Test documents are left
    out, so nothing about the evaluation queries is trained on. In-batch negatives, when
    asked for, go to the retrieval source only (data.TrainDataset decides).
    """


    builtin = builtin_dataset(seed=0, num_hard_negatives=max(hard_negatives, 1))
    sources = [data.TrainDataset("builtin-retrieval", builtin.train_examples,
                                 in_batch_negatives=in_batch_negatives,
                                 num_hard_negatives=hard_negatives)]
    if stage == 2:
        rows = []
        # unique, in order
        for document in dict.fromkeys(example.positive for example in builtin.train_examples):
            kinds = [kind for kind, words in BUILTIN_TYPES.items()
                     if any(re.search(rf"\b{re.escape(word)}\b", document) for word in words)]
            if len(kinds) == 1:  # a trait clause may name another kind's word; skip those documents
                rows.append((document, kinds[0]))
        pairs = data.classification_pairs(rows, BUILTIN_TYPE_INSTRUCTION,
                                          num_negatives=hard_negatives, seed=seed)
        sources.append(data.TrainDataset("builtin-kind-classification", pairs,
                                         in_batch_negatives=in_batch_negatives,
                                         num_hard_negatives=hard_negatives))
    return sources


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the built-in dataset: a BEIR folder plus "
                                                 "train.jsonl.")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    args = parser.parse_args(argv)
    built = builtin_dataset(args.seed)
    write_beir(args.out, built.corpus, built.queries, built.qrels)
    write_training_file(Path(args.out) / "train.jsonl", built.train_examples)
    print(f"wrote {len(built.corpus)} documents, {len(built.qrels['train'])} train and "
          f"{len(built.qrels['test'])} test queries, {len(built.train_examples)} training examples "
          f"to {args.out}")


if __name__ == "__main__":
    main()
