"""Write the bundled synthetic multilingual retrieval data set (deterministic from --seed).

    python tools/make_demo_data.py                       # -> train/demo_data/
    python tools/make_demo_data.py --out DIR --seed 1

Files:
  train.jsonl           {"query", "pos": [1], "neg": [7-8], "pos_scores", "neg_scores"}
  heldout.jsonl         {"query_id", "query", "pos": [1], "qrels": {doc_id: 1}}
  heldout_corpus.jsonl  {"id", "text"}: every held-out positive plus same-topic distractors
  heldout_beir/         the held-out set in BEIR's layout (corpus.jsonl, queries.jsonl,
                        qrels/test.tsv), for `m3-jax evaluate --data`
  texts.jsonl           {"text"}: --pretraining (8000) new documents, none of them in the
                        other files: the plain-text corpus of the pre-training demo (RetroMAE,
                        stage 1)
  pairs.jsonl           {"query", "pos": [1]}: the same documents, each with a query and no
                        negatives or teacher scores (unsupervised contrastive pre-training,
                        stage 2)

The text is made of "words" written in the scripts the tiny tokenizer is trained on
(`m3_jax.tiny.SCRIPTS`), so a tiny model trained from scratch can read it. Each topic has its own
words (sharing some with a neighbouring topic) over a per-script set of stop words, and each
document has a few key words of its own. A query is 2-3 of its document's key words, sometimes
with a topic word and a noise word. Hard negatives come from the same and the neighbouring topic,
so ranking them below the positive needs the key words, not just the topic: word matching that
a model learns in a few hundred steps, from a near-random start. Teacher scores imitate a
reranker: mostly the share of query words found in the passage, plus noise.

Most passages are 20-90 tokens; 7% of the examples have 100-230-token passages and 3% have
260-400-token ones, so the 128, 256 and 512 buckets are all used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from m3_jax.evaluation.datasets import load_heldout, write_beir
from m3_jax.tiny import SCRIPTS

# Tokenizer scripts used for words: Latin, Cyrillic, Chinese, Greek, Arabic (digits are noise).
WORD_SCRIPTS = SCRIPTS[:5]
TOPICS_PER_SCRIPT = 6
TOPIC_WORDS = 40
SHARED_WITH_NEIGHBOUR = 12
KEY_WORDS_PER_TOPIC = 240
STOP_WORDS = 12
# (share of examples, passage length range in tokens); tokens ~ characters + 3 with this tokenizer.
LENGTH_CLASSES = ((0.90, (20, 90)), (0.07, (100, 230)), (0.03, (260, 400)))


@dataclasses.dataclass(frozen=True)
class Topic:
    script: int
    words: tuple[str, ...]
    key_words: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Doc:
    topic: int
    length_class: int
    key_words: tuple[str, ...]
    text: str


def make_word(rng: np.random.Generator, alphabet: str, script: int) -> str:
    # Chinese characters are single tokens, so shorter words carry as much as longer Latin ones.
    low, high = (2, 3) if len(alphabet) > 200 else (3, 6)
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(low, high + 1))))


def make_topics(rng: np.random.Generator) -> tuple[list[Topic], list[list[str]]]:
    topics, stop_words = [], []
    for script, alphabet in enumerate(WORD_SCRIPTS):
        stop_words.append([make_word(rng, alphabet, script) for _ in range(STOP_WORDS)])
        own = [
            [make_word(rng, alphabet, script) for _ in range(TOPIC_WORDS - SHARED_WITH_NEIGHBOUR)]
            for _ in range(TOPICS_PER_SCRIPT)
        ]
        for k in range(TOPICS_PER_SCRIPT):
            # Neighbouring topics (k-1, k) share words: the source of the hardest negatives.
            previous = own[(k - 1) % TOPICS_PER_SCRIPT][:SHARED_WITH_NEIGHBOUR]
            keys = tuple(make_word(rng, alphabet, script) for _ in range(KEY_WORDS_PER_TOPIC))
            topics.append(Topic(script, tuple(own[k] + previous), keys))
    return topics, stop_words


def neighbour(topic: int) -> int:
    script, k = divmod(topic, TOPICS_PER_SCRIPT)
    return script * TOPICS_PER_SCRIPT + (k + 1) % TOPICS_PER_SCRIPT


def make_doc(
    rng: np.random.Generator,
    topics: list[Topic],
    stop_words: list[list[str]],
    topic_index: int,
    length_class: int,
) -> Doc:
    topic = topics[topic_index]
    low, high = LENGTH_CLASSES[length_class][1]
    target_chars = int(rng.integers(low, high + 1)) - 3
    keys = tuple(rng.choice(topic.key_words, size=int(rng.integers(4, 7)), replace=False))
    words: list[str] = []
    # Every key word at least once, so the query's words are always in its positive.
    pending = list(keys)
    while sum(len(w) + 1 for w in words) < target_chars or pending:
        u = rng.random()
        if pending and (u < 0.25 or sum(len(w) + 1 for w in words) > 0.7 * target_chars):
            word = pending.pop()
        elif u < 0.35:
            word = str(rng.choice(keys))
        elif u < 0.6:
            word = str(rng.choice(stop_words[topic.script]))
        elif u < 0.97:
            word = str(rng.choice(topic.words))
        else:
            # Code-switching: a word from another script's topic keeps the data multilingual.
            word = str(rng.choice(topics[int(rng.integers(len(topics)))].words))
        words.append(word)
    return Doc(topic_index, length_class, keys, " ".join(words))


def make_query(rng: np.random.Generator, doc: Doc, topics: list[Topic]) -> str:
    words = list(rng.choice(doc.key_words, size=int(rng.integers(2, 4)), replace=False))
    if rng.random() < 0.5:
        words.append(str(rng.choice(topics[doc.topic].words)))
    if rng.random() < 0.2:
        words.append("".join(rng.choice(list(SCRIPTS[-1]), size=int(rng.integers(2, 5)))))
    rng.shuffle(words)
    return " ".join(words)


def teacher_score(rng: np.random.Generator, query: str, doc: Doc) -> float:
    words = query.split()
    text_words = set(doc.text.split())
    overlap = sum(w in text_words for w in words) / len(words)
    return round(float(8.0 * overlap - 2.0 + rng.normal(0.0, 0.5)), 3)


def make_docs(rng, topics, stop_words, count: int) -> list[Doc]:
    shares = np.asarray([share for share, _ in LENGTH_CLASSES])
    classes = rng.choice(len(LENGTH_CLASSES), size=count, p=shares / shares.sum())
    return [
        make_doc(rng, topics, stop_words, int(rng.integers(len(topics))), int(c)) for c in classes
    ]


def pick_negatives(rng: np.random.Generator, docs: list[Doc], index: int, by_key) -> list[int]:
    """4 same-topic, 2 neighbour-topic and 1-2 random negatives, never longer than the positive's
    length class (so the positive sets the example's length bucket)."""
    doc = docs[index]
    chosen: list[int] = []

    def take(candidates: list[int], n: int) -> None:
        pool = [c for c in candidates if c != index and c not in chosen]
        if pool:
            chosen.extend(int(c) for c in rng.choice(pool, size=min(n, len(pool)), replace=False))

    def fitting(topic: int | None) -> list[int]:
        return [i for c in range(doc.length_class + 1) for i in by_key.get((topic, c), [])]

    take(fitting(doc.topic), 4)
    take(fitting(neighbour(doc.topic)), 2)
    take(fitting(None), int(rng.integers(1, 3)))
    while len(chosen) < 7:
        take(fitting(None), 7 - len(chosen))
    return chosen


def train_records(rng, topics, stop_words, count: int) -> list[dict]:
    docs = make_docs(rng, topics, stop_words, count)
    by_key: dict[tuple[int | None, int], list[int]] = {}
    for i, doc in enumerate(docs):
        by_key.setdefault((doc.topic, doc.length_class), []).append(i)
        by_key.setdefault((None, doc.length_class), []).append(i)
    records = []
    for i, doc in enumerate(docs):
        query = make_query(rng, doc, topics)
        negatives = [docs[j] for j in pick_negatives(rng, docs, i, by_key)]
        records.append(
            {
                "query": query,
                "pos": [doc.text],
                "neg": [d.text for d in negatives],
                "pos_scores": [teacher_score(rng, query, doc)],
                "neg_scores": [teacher_score(rng, query, d) for d in negatives],
            }
        )
    return records


def heldout_sets(rng, topics, stop_words, queries: int, distractors: int):
    docs = make_docs(rng, topics, stop_words, queries + distractors)
    order = rng.permutation(len(docs))
    doc_ids = {int(i): f"d{rank:04d}" for rank, i in enumerate(order)}
    corpus = [{"id": doc_ids[int(i)], "text": docs[int(i)].text} for i in order]
    heldout = [
        {
            "query_id": f"q{i:04d}",
            "query": make_query(rng, docs[i], topics),
            "pos": [docs[i].text],
            "qrels": {doc_ids[i]: 1},
        }
        for i in range(queries)
    ]
    return heldout, corpus


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def pretraining_sets(rng, topics, stop_words, count: int) -> tuple[list[dict], list[dict]]:
    """(texts, pairs) of the first two stages: `count` new documents, as plain texts and each
    with a query of its key words (the weakly supervised pairs of stage 2: no negatives, no
    teacher scores). As in the paper, pre-training sees far more text than fine-tuning."""
    docs = make_docs(rng, topics, stop_words, count)
    pairs = [{"query": make_query(rng, doc, topics), "pos": [doc.text]} for doc in docs]
    return [{"text": doc.text} for doc in docs], pairs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("train/demo_data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="training examples")
    parser.add_argument("--heldout", type=int, default=200, help="held-out queries")
    parser.add_argument("--distractors", type=int, default=800, help="extra corpus documents")
    parser.add_argument(
        "--pretraining", type=int, default=8000, help="documents of the pre-training sets"
    )
    args = parser.parse_args()

    # Separate streams, so changing one set's size leaves the others unchanged.
    topics, stop_words = make_topics(np.random.default_rng((args.seed, 0)))
    train = train_records(np.random.default_rng((args.seed, 1)), topics, stop_words, args.train)
    heldout, corpus = heldout_sets(
        np.random.default_rng((args.seed, 2)), topics, stop_words, args.heldout, args.distractors
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    write_jsonl(args.out / "heldout_corpus.jsonl", corpus)
    texts, pairs = pretraining_sets(
        np.random.default_rng((args.seed, 3)), topics, stop_words, args.pretraining
    )
    write_jsonl(args.out / "texts.jsonl", texts)
    write_jsonl(args.out / "pairs.jsonl", pairs)
    beir = write_beir(
        load_heldout(args.out / "heldout.jsonl", args.out / "heldout_corpus.jsonl"),
        args.out / "heldout_beir",
    )
    for name in (
        "train.jsonl",
        "heldout.jsonl",
        "heldout_corpus.jsonl",
        "texts.jsonl",
        "pairs.jsonl",
    ):
        print(f"{args.out / name}: {(args.out / name).stat().st_size / 1e6:.2f} MB")
    print(f"{beir}: BEIR layout of the held-out set")


if __name__ == "__main__":
    main()
