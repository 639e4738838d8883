"""The training loader (m3_jax/data/pipeline.py) over a prepared set: batch contents, truncation,
host slices, positions, global arrays."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3_jax.config import DataConfig
from m3_jax.data.pipeline import LoaderPosition, TrainLoader, to_global_batch
from m3_jax.data.prepare import prepare
from m3_jax.data.prepared import PreparedSet
from m3_jax.data.sources import prepare_settings
from m3_jax.input_files import InputError
from m3_jax.tokenization import load_tokenizer, tokenize

GROUP = 4


def make_rows(count: int = 120, seed: int = 0) -> list[dict]:
    """Records with unique texts; one in five has a long positive, so two buckets are used."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")

    def words(n: int) -> str:
        return " ".join("".join(rng.choice(letters, size=4)) for _ in range(n))

    rows = []
    for i in range(count):
        num_neg = int(rng.integers(1, 6))
        row = {
            "query": f"{i} query {words(int(rng.integers(1, 5)))}",
            "pos": [f"pos {i} {words(40 if i % 5 == 0 else int(rng.integers(2, 12)))}"],
            "neg": [f"neg {i} {j} {words(int(rng.integers(2, 12)))}" for j in range(num_neg)],
            "pos_scores": [float(i)],
            "neg_scores": [float(-j) for j in range(num_neg)],
        }
        if i % 3 == 0:
            row["prompt"] = "Find: "
        rows.append(row)
    return rows


DATA = DataConfig(
    group_size=GROUP,
    query_max_len=16,
    passage_max_len=256,
    passage_buckets=(64, 128, 256),
    token_budget=6000,
    query_instruction="Q: ",
    knowledge_distillation=True,
)


def prepared(tmp: Path, rows: list[dict], tokenizer_dir, data: DataConfig = DATA) -> PreparedSet:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "prepared"
    prepare([path], out, prepare_settings(data, tokenizer_dir), progress=False)
    return PreparedSet(out)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer_dir) -> PreparedSet:
    return prepared(tmp_path_factory.mktemp("prepared"), make_rows(), tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def make_loader(source, tokenizer, data=DATA, **kwargs) -> TrainLoader:
    pad = tokenizer.pad_token_id
    return TrainLoader([source], data, seed=5, batch_multiple=8, pad_id=pad, **kwargs)


@pytest.fixture(scope="module")
def loader(source, tokenizer):
    return make_loader(source, tokenizer)


def test_buckets_and_shapes(loader):
    shapes = loader.bucket_shapes()
    assert len(shapes) >= 2 and all(s.batch_size % 8 == 0 for s in shapes)
    assert {s.passage_len for s in shapes} <= {64, 128, 256}
    assert {(s.group_size, s.in_batch_negatives) for s in shapes} == {(GROUP, True)}
    assert loader.steps_per_epoch == sum(b.batches for b in loader.buckets) > 0
    assert loader.num_records == 120


def test_host_batch_contents(loader, tokenizer):
    """Every row is its record: the query with its instruction or prompt, the positive first,
    the teacher scores aligned; right padding with the pad id."""
    pad = tokenizer.pad_token_id
    by_query = {}
    for row in make_rows():
        query = tokenize(tokenizer, [row.get("prompt", "Q: ") + row["query"]], 16)[0]
        by_query[tuple(query)] = row
    seen = set()
    for step in range(loader.steps_per_epoch):
        batch = loader.host_batch(LoaderPosition(1, step))
        b, lq, lp = loader.batch_shape(LoaderPosition(1, step))[:3]
        assert set(batch) == {
            "query_ids",
            "query_mask",
            "passage_ids",
            "passage_mask",
            "teacher_scores",
        }
        assert batch["query_mask"].shape == (b, lq)
        assert batch["passage_ids"].shape == batch["passage_mask"].shape == (b * GROUP, lp)
        assert batch["teacher_scores"].shape == (b, GROUP)
        assert batch["teacher_scores"].dtype == np.float32
        for key in ("query_ids", "query_mask", "passage_ids", "passage_mask"):
            assert batch[key].dtype == np.int32
        for ids, mask in [
            (batch["query_ids"], batch["query_mask"]),
            (batch["passage_ids"], batch["passage_mask"]),
        ]:
            lengths = mask.sum(axis=1)
            np.testing.assert_array_equal(mask, np.arange(mask.shape[1]) < lengths[:, None])
            assert (ids[mask == 0] == pad).all() and (ids[mask == 1] != pad).all()
        for r in range(b):
            query = tuple(batch["query_ids"][r, : batch["query_mask"][r].sum()].tolist())
            row = by_query[query]
            seen.add(query)
            positive = tokenize(tokenizer, [row["pos"][0]], 256)[0]
            assert batch["passage_ids"][r * GROUP, : len(positive)].tolist() == positive
            negatives = {tuple(tokenize(tokenizer, [n], 256)[0]) for n in row["neg"]}
            for g in range(1, GROUP):
                ids = batch["passage_ids"][r * GROUP + g]
                assert tuple(ids[: batch["passage_mask"][r * GROUP + g].sum()]) in negatives
            assert batch["teacher_scores"][r, 0] == row["pos_scores"][0]
            assert (batch["teacher_scores"][r, 1:] <= 0).all()
    assert len(seen) == sum(b.batches * b.batch_size for b in loader.buckets)


def test_truncation_to_the_runs_max_lengths(source, tokenizer):
    """A set prepared at 256 tokens trains at 40: the ids the tokenizer gives at 40."""
    data = dataclasses.replace(DATA, passage_max_len=40, query_max_len=8)
    short = make_loader(source, tokenizer, data)
    assert {s.passage_len for s in short.bucket_shapes()} == {40}
    rows = {r["pos"][0]: r for r in make_rows()}
    want = {tuple(tokenize(tokenizer, [p], 40)[0]): p for p in rows}
    batch = short.host_batch(LoaderPosition(0, 0))
    for r in range(batch["query_ids"].shape[0]):
        ids = batch["passage_ids"][r * GROUP]
        assert tuple(ids[: batch["passage_mask"][r * GROUP].sum()].tolist()) in want
        assert batch["query_mask"][r].sum() <= 8


def test_process_slices_union_is_the_global_batch(source, tokenizer):
    one = make_loader(source, tokenizer)
    two = [make_loader(source, tokenizer, process_index=p, process_count=2) for p in range(2)]
    assert one.bucket_shapes() == two[0].bucket_shapes()
    for step in range(min(4, one.steps_per_epoch)):
        position = LoaderPosition(0, step)
        full = one.host_batch(position)
        halves = [loader.host_batch(position) for loader in two]
        for key, value in full.items():
            assert halves[0][key].shape[0] * 2 == value.shape[0]
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)


def test_position_json_round_trip_and_errors(loader):
    position = LoaderPosition(epoch=3, step=17)
    assert position.to_json() == {"epoch": 3, "step": 17}
    assert LoaderPosition.from_json(position.to_json()) == position
    for bad, field in [({"epoch": 1}, "step"), ({"epoch": -1, "step": 0}, "epoch")]:
        with pytest.raises(ValueError, match=f"field '{field}'"):
            LoaderPosition.from_json(bad)
    end = loader.steps_per_epoch
    assert loader.normalize(LoaderPosition(2, end)) == LoaderPosition(3, 0)
    with pytest.raises(ValueError, match=f"step {end + 1} is past the end"):
        loader.host_batch(LoaderPosition(0, end + 1))


def flatten(items):
    return [
        (position, shape, {k: v.tolist() for k, v in batch.items()})
        for position, shape, batch in items
    ]


def test_iterate_resumes_exactly(loader):
    n = loader.steps_per_epoch
    full = flatten(loader.iterate(num_epochs=2))
    assert len(full) == 2 * n
    assert full[n - 1][0] == LoaderPosition(1, 0) and full[-1][0] == LoaderPosition(2, 0)
    assert [p for p, _, _ in full[: n - 1]] == [LoaderPosition(0, s + 1) for s in range(n - 1)]
    # Epochs differ, and each batch is the pure function host_batch(position before it).
    assert full[0][2] != full[n][2]
    before = LoaderPosition(1, 0)
    assert flatten([(None, None, loader.host_batch(before))])[0][2] == full[n][2]
    assert loader.batch_shape(before) == full[n][1]
    for cut in (1, n - 1, n + 1):
        resume = LoaderPosition.from_json(full[cut - 1][0].to_json())
        assert flatten(loader.iterate(resume, num_epochs=2)) == full[cut:]
    # Forever by default.
    head = flatten(itertools.islice(loader.iterate(), n + 2))
    assert head == full[: n + 2]


def test_to_global_batch_on_eight_devices(loader):
    devices = jax.devices()
    assert len(devices) == 8, "conftest sets XLA_FLAGS for 8 CPU devices"
    mesh = Mesh(np.asarray(devices), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batch = loader.host_batch(LoaderPosition(0, 0))
    arrays = to_global_batch(batch, sharding)
    for key, value in batch.items():
        assert arrays[key].shape == value.shape and arrays[key].dtype == value.dtype
        assert arrays[key].sharding == sharding
        assert len(arrays[key].addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(arrays[key]), value)
    per_key = {k: NamedSharding(mesh, PartitionSpec("data", None)) for k in batch}
    arrays = to_global_batch(batch, per_key)
    assert arrays["passage_ids"].addressable_shards[0].data.shape == (
        batch["passage_ids"].shape[0] // 8,
        batch["passage_ids"].shape[1],
    )


def test_loader_errors_name_the_record(tmp_path, tokenizer_dir, tokenizer, source):
    rows = make_rows(40)
    no_neg = rows[:7] + [{"query": "q", "pos": ["p"]}]
    plain = dataclasses.replace(DATA, knowledge_distillation=False)
    with pytest.raises(InputError, match=r"train.jsonl:8: field 'neg'"):
        make_loader(prepared(tmp_path / "a", no_neg, tokenizer_dir, plain), tokenizer, plain)
    unscored = rows[:8] + [{"query": "q", "pos": ["p"], "neg": ["n"]}]
    with pytest.raises(InputError, match=r"train.jsonl:9: field 'pos_scores'"):
        make_loader(prepared(tmp_path / "b", unscored, tokenizer_dir), tokenizer)
    with pytest.raises(InputError, match="no length bucket"):
        make_loader(prepared(tmp_path / "c", rows[:5], tokenizer_dir), tokenizer)
    with pytest.raises(ValueError, match="not a multiple of process_count 3"):
        make_loader(source, tokenizer, process_index=0, process_count=3)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def flag_embedding_rows(name: str, count: int, num_neg: int, **fields) -> list[dict]:
    return [
        {
            "query": f"{name} {i}",
            "pos": [f"{name} pos {i}"],
            "neg": [f"{name} neg {i} {j}" for j in range(num_neg)],
            "prompt": f"{name}: ",
            **fields,
        }
        for i in range(count)
    ]


# FlagEmbedding-format inputs: file -> (records' fields, negatives, group size, batch size,
# in-batch negatives). The default batch is 4 rows per shard over 4 shards; `symmetric*`
# halves it, a record's batch_size sets it per shard.
FLAG_EMBEDDING_FILES = {
    "retrieval/normal.jsonl": ({"type": "normal"}, 5, 4, 16, True),
    "retrieval/sts.jsonl": ({"type": "symmetric_sts"}, 5, 4, 8, True),
    "retrieval/one.jsonl": ({"type": "only_1neg"}, 3, 2, 16, True),
    "retrieval/cls.jsonl": ({"type": "symmetric_class"}, 2, 3, 8, True),
    "qa_no_in_batch_neg/own.jsonl": ({"batch_size": 2, "train_group_size": 3}, 5, 3, 8, False),
}


def test_flag_embedding_datasets_types_and_batch_sizes(tmp_path, tokenizer_dir, tokenizer):
    """Every global batch comes from one input file, with that file's group size, batch size
    and in-batch-negative rule; prompts reach the queries (and, for symmetric_sts, passages)."""
    expected, query_of = {}, {}
    for name, (fields, num_neg, *rules) in FLAG_EMBEDDING_FILES.items():
        rows = flag_embedding_rows(Path(name).stem, 40, num_neg, **fields)
        write_jsonl(tmp_path / "data" / name, rows)
        expected[Path(name).stem] = tuple(rules)
        for row in rows:
            query = tokenize(tokenizer, [row["prompt"] + row["query"]], 48)[0]
            query_of[tuple(query)] = row
    data = DataConfig(group_size=4, query_max_len=48, passage_max_len=64, passage_buckets=(64,))
    data = dataclasses.replace(data, token_budget=10**6, max_batch_size=16)
    out = tmp_path / "prepared"
    inputs = [tmp_path / "data/retrieval", tmp_path / "data/qa_no_in_batch_neg"]
    prepare(inputs, out, prepare_settings(data, tokenizer_dir), progress=False)
    loader = TrainLoader(
        [PreparedSet(out)], data, seed=1, batch_multiple=4, pad_id=tokenizer.pad_token_id
    )
    assert len(loader.bucket_shapes()) == 5  # one compiled program per distinct shape
    batches_of: dict[str, int] = {}
    for step in range(loader.steps_per_epoch):
        shape = loader.batch_shape(LoaderPosition(0, step))
        batch = loader.host_batch(LoaderPosition(0, step))
        rows = [
            query_of[tuple(ids[: mask.sum()].tolist())]
            for ids, mask in zip(batch["query_ids"], batch["query_mask"], strict=True)
        ]
        names = {r["query"].split()[0] for r in rows}
        assert len(names) == 1, f"step {step} mixes datasets {names}"
        name = names.pop()
        group, size, in_batch = expected[name]
        assert (shape.group_size, shape.batch_size, shape.in_batch_negatives) == (
            group,
            size,
            in_batch,
        )
        assert batch["passage_ids"].shape[0] == size * group
        assert len({r["query"] for r in rows}) == size  # no record twice in a batch
        first = batch["passage_ids"][0, : batch["passage_mask"][0].sum()].tolist()
        prefix = f"{name}: " if name == "sts" else ""
        assert first == tokenize(tokenizer, [prefix + rows[0]["pos"][0]], 64)[0]
        batches_of[name] = batches_of.get(name, 0) + 1
    assert batches_of == {name: 40 // size for name, (_, size, _) in expected.items()}
