"""Records (m3_jax/data/records.py) and group sampling (m3_jax/data/sampler.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from m3_jax.config import DataConfig
from m3_jax.data.records import Record, data_files, iter_records
from m3_jax.data.sampler import apply_instructions, sample_group
from m3_jax.input_files import InputError

GOOD = {"query": "q", "pos": ["p0", "p1"], "neg": ["n0", "n1", "n2"]}
SCORED = {**GOOD, "pos_scores": [5.0, 4.0], "neg_scores": [1.0, 3.0, 2.0]}


def read_records(paths) -> list[Record]:
    return [r for path in data_files(paths) for r in iter_records(path)]


def write_lines(path: Path, lines: list) -> Path:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def test_read_records_fields_and_source(tmp_path):
    extra = {**SCORED, "prompt": "Find: ", "type": "normal", "batch_size": 3}
    path = write_lines(tmp_path / "a.jsonl", [GOOD, "", extra])
    records = read_records(path)
    assert len(records) == 2
    first, second = records
    assert first == Record(
        "q", ("p0", "p1"), ("n0", "n1", "n2"), None, None, None, None, None, None, f"{path}:1"
    )
    assert second.pos_scores == (5.0, 4.0) and second.neg_scores == (1.0, 3.0, 2.0)
    assert second.prompt == "Find: " and second.type == "normal" and second.batch_size == 3
    assert second.source == f"{path}:3"  # blank lines keep the numbering


def test_read_directory_sorted_and_list_of_paths(tmp_path):
    write_lines(tmp_path / "b.jsonl", [{**GOOD, "query": "b"}])
    write_lines(tmp_path / "a.json", [{**GOOD, "query": "a"}])
    write_lines(tmp_path / "c.txt", [{**GOOD, "query": "ignored"}])
    assert [r.query for r in read_records(tmp_path)] == ["a", "b"]
    assert [r.query for r in read_records([tmp_path / "b.jsonl", tmp_path / "a.json"])] == [
        "b",
        "a",
    ]


def test_negatives_may_be_missing(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [{"query": "q", "pos": ["p"]}])
    assert read_records(path)[0].neg == ()


@pytest.mark.parametrize(
    "line, field, words",
    [
        ('{"query": "q", "pos": ["p"]', None, "invalid JSON"),
        ('["q", "p"]', None, "expected a JSON object"),
        ({"pos": ["p"]}, "query", "missing"),
        ({"query": "  ", "pos": ["p"]}, "query", "empty"),
        ({"query": 3, "pos": ["p"]}, "query", "expected a string"),
        ({"query": "q"}, "pos", "missing"),
        ({"query": "q", "pos": []}, "pos", "empty list"),
        ({"query": "q", "pos": "p"}, "pos", "expected a list"),
        ({"query": "q", "pos": ["p", 1]}, "pos[1]", "expected a string"),
        ({"query": "q", "pos": ["p"], "neg": ["n", ""]}, "neg[1]", "empty"),
        ({"query": "q", "pos": ["p"], "neg": [None]}, "neg[0]", "expected a string"),
        ({**SCORED, "pos_scores": [1.0]}, "pos_scores", "1 scores for 2"),
        ({**SCORED, "neg_scores": [1.0, 2.0, 3.0, 4.0]}, "neg_scores", "4 scores for 3"),
        ({**SCORED, "neg_scores": [1.0, "x", 2.0]}, "neg_scores[1]", "expected a number"),
        ({**SCORED, "pos_scores": [1.0, True]}, "pos_scores[1]", "expected a number"),
        ({**SCORED, "pos_scores": 1.0}, "pos_scores", "expected a list"),
        ({**SCORED, "neg_scores": None}, "neg_scores", "missing while"),
        ({**GOOD, "neg_scores": [1.0, 2.0, 3.0]}, "pos_scores", "missing while"),
        ({**GOOD, "type": "weird"}, "type", "unknown value 'weird'"),
        ({**GOOD, "prompt": 5}, "prompt", "expected a string"),
        ({**GOOD, "batch_size": 0}, "batch_size", "expected a positive integer"),
        ({**GOOD, "train_group_size": "8"}, "train_group_size", "expected a positive integer"),
    ],
)
def test_errors_name_file_line_field(tmp_path, line, field, words):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(InputError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    if field is not None:
        assert f"field '{field}'" in message
    assert words in message


def test_nan_score_rejected(tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"query": "q", "pos": ["p"], "pos_scores": [NaN]}\n')
    with pytest.raises(InputError, match=r"nan.jsonl:1: field 'pos_scores\[0\]': not finite"):
        read_records(path)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: directory holds no"):
        read_records(tmp_path / "empty")


def test_positive_uniform_and_negatives_without_replacement():
    positives = Counter()
    for seed in range(300):
        pos, neg = sample_group(3, 10, 8, np.random.default_rng(seed))
        assert len(neg) == 7 and len(set(neg.tolist())) == 7 and neg.max() < 10
        positives[pos] += 1
    assert set(positives) == {0, 1, 2} and min(positives.values()) > 60


def test_few_negatives_repeat_at_most_ceil_times():
    # 7 negatives from 3: the index list is repeated ceil(7/3) = 3 times, then sampled.
    seen_repeat = False
    for seed in range(50):
        counts = Counter(sample_group(1, 3, 8, np.random.default_rng(seed))[1].tolist())
        assert sum(counts.values()) == 7 and set(counts) <= {0, 1, 2}
        assert max(counts.values()) <= 3
        seen_repeat |= max(counts.values()) > 1
    assert seen_repeat
    assert sample_group(1, 1, 4, np.random.default_rng(0))[1].tolist() == [0, 0, 0]


def test_group_size_one_and_missing_negatives():
    pos, neg = sample_group(1, 0, 1, np.random.default_rng(0))
    assert pos == 0 and neg.shape == (0,)
    with pytest.raises(ValueError, match="group_size=2 needs negatives"):
        sample_group(1, 0, 2, np.random.default_rng(0))


def test_sampling_reproducible_from_seed():
    def draw(*seed):
        pos, neg = sample_group(4, 20, 8, np.random.default_rng(seed))
        return [pos, *neg.tolist()]

    assert draw(1, 2, 3, 4) == draw(1, 2, 3, 4)
    assert draw(1, 2, 3, 4) != draw(1, 2, 3, 5)


def test_negatives_sorted_by_teacher():
    scores = np.float32([3, 9, 1, 7, 5, 2, 8, 0, 6, 4])
    for seed in range(20):
        pos, neg = sample_group(2, 10, 6, np.random.default_rng(seed))
        o_pos, ordered = sample_group(
            2, 10, 6, np.random.default_rng(seed), neg_scores=scores, sort_negatives_by_teacher=True
        )
        # The same draw, negatives reordered by score, descending.
        assert o_pos == pos and sorted(ordered.tolist()) == sorted(neg.tolist())
        assert list(scores[ordered]) == sorted(scores[neg], reverse=True)
    with pytest.raises(ValueError, match="needs teacher scores"):
        sample_group(1, 5, 3, np.random.default_rng(0), sort_negatives_by_teacher=True)


def test_instructions():
    def query_of(prompt=None, **data) -> str:
        return apply_instructions("q", ["p"], prompt, DataConfig(**data))[0]

    assert apply_instructions("q", ["p"], None, DataConfig()) == ("q", ["p"])
    data = DataConfig(query_instruction="Q: ", passage_instruction="P: ")
    assert apply_instructions("q", ["a", "b"], None, data) == ("Q: q", ["P: a", "P: b"])
    # A record's prompt replaces the configured instruction; nothing ever adds "None".
    assert query_of(query_instruction="Q: ", prompt="R: ") == "R: q"
    assert query_of(prompt="R: ") == "R: q"
    assert query_of(query_instruction="Q: ", prompt="") == "q"
    assert query_of(prompt="R", instruction_format="{}\n{}") == "R\nq"
    # Symmetric text pairs: the passages take the query's instruction (FlagEmbedding).
    for record_type, passage in (("symmetric_sts", "R: p"), ("symmetric_class", "P: p")):
        assert apply_instructions("q", ["p"], "R: ", data, record_type) == ("R: q", [passage])
    with pytest.raises(ValueError, match="two"):
        DataConfig(instruction_format="{}")
    with pytest.raises(ValueError, match="two"):
        DataConfig(instruction_format="{1}{0}")
