"""The training loader (m3_jax/data/pipeline.py): batches, host slices, positions, global arrays."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3_jax.config import DataConfig
from m3_jax.data.pipeline import LoaderPosition, TrainLoader, to_global_batch
from m3_jax.data.records import Record
from m3_jax.input_files import InputError
from m3_jax.tokenization import load_tokenizer, tokenize

GROUP = 4


def make_records(count: int = 120, seed: int = 0) -> list[Record]:
    """Records with unique texts; one in five has a long positive, so two buckets are used."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")

    def words(n: int) -> str:
        return " ".join("".join(rng.choice(letters, size=4)) for _ in range(n))

    records = []
    for i in range(count):
        num_neg = int(rng.integers(1, 6))
        records.append(
            Record(
                query=f"query {i} {words(int(rng.integers(1, 5)))}",
                pos=(f"pos {i} {words(40 if i % 5 == 0 else int(rng.integers(2, 12)))}",),
                neg=tuple(f"neg {i} {j} {words(int(rng.integers(2, 12)))}" for j in range(num_neg)),
                pos_scores=(float(i),),
                neg_scores=tuple(float(-j) for j in range(num_neg)),
                prompt="Find: " if i % 3 == 0 else None,
                type=None,
                source=f"mem:{i + 1}",
            )
        )
    return records


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


DATA = DataConfig(
    group_size=GROUP,
    query_max_len=16,
    passage_max_len=256,
    passage_buckets=(64, 128, 256),
    token_budget=6000,
    query_instruction="Q: ",
    knowledge_distillation=True,
)


def make_loader(records, tokenizer, data=DATA, **kwargs) -> TrainLoader:
    return TrainLoader(records, tokenizer, data, seed=5, batch_multiple=8, **kwargs)


@pytest.fixture(scope="module")
def loader(tokenizer):
    return make_loader(make_records(), tokenizer)


def test_buckets_and_shapes(loader):
    shapes = loader.bucket_shapes()
    assert len(shapes) >= 2 and all(b % 8 == 0 for b, _, _ in shapes)
    assert {lp for _, _, lp in shapes} <= {64, 128, 256}
    assert loader.steps_per_epoch == len(loader.plan(0)) > 0


def test_host_batch_contents(loader, tokenizer):
    pad = tokenizer.pad_token_id
    for step in range(loader.steps_per_epoch):
        position = LoaderPosition(1, step)
        batch = loader.host_batch(position)
        planned = loader.plan(1)[step]
        b, lq, lp = loader.bucket_shapes()[planned.bucket_index]
        assert set(batch) == {
            "query_ids",
            "query_mask",
            "passage_ids",
            "passage_mask",
            "teacher_scores",
        }
        assert batch["query_ids"].shape == batch["query_mask"].shape == (b, lq)
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
            # Right padding: ones then zeros, pad ids exactly where the mask is zero.
            np.testing.assert_array_equal(mask, np.arange(mask.shape[1]) < lengths[:, None])
            assert (ids[mask == 0] == pad).all() and (ids[mask == 1] != pad).all()
        # Row r: its record's query (with instruction or prompt) and its positive at r * G.
        for row, index in enumerate(planned.example_indices):
            record = loader.records[index]
            prefix = record.prompt or "Q: "
            query = tokenize(tokenizer, [prefix + record.query], 16)[0]
            positive = tokenize(tokenizer, [record.pos[0]], 256)[0]
            assert batch["query_ids"][row, : len(query)].tolist() == query
            assert batch["passage_ids"][row * GROUP, : len(positive)].tolist() == positive
            assert batch["teacher_scores"][row, 0] == record.pos_scores[0]


def test_process_slices_union_is_the_global_batch(tokenizer):
    records = make_records()
    one = make_loader(records, tokenizer)
    two = [make_loader(records, tokenizer, process_index=p, process_count=2) for p in range(2)]
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
    return [(position, {k: v.tolist() for k, v in batch.items()}) for position, batch in items]


def test_iterate_resumes_exactly(loader):
    n = loader.steps_per_epoch
    full = flatten(loader.iterate(num_epochs=2))
    assert len(full) == 2 * n
    assert full[n - 1][0] == LoaderPosition(1, 0) and full[-1][0] == LoaderPosition(2, 0)
    assert [p for p, _ in full[: n - 1]] == [LoaderPosition(0, s + 1) for s in range(n - 1)]
    # Epochs differ, and each batch is the pure function host_batch(position before it).
    assert full[0][1] != full[n][1]
    assert flatten([(None, loader.host_batch(LoaderPosition(1, 0)))])[0][1] == full[n][1]
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


def test_loader_errors_name_the_record(tokenizer):
    records = make_records(40)
    no_neg = records[:7] + [Record("q", ("p",), (), None, None, None, None, "f.jsonl:8")]
    with pytest.raises(InputError, match="f.jsonl:8: field 'neg'"):
        make_loader(no_neg, tokenizer, dataclasses.replace(DATA, knowledge_distillation=False))
    unscored = records[:7] + [Record("q", ("p",), ("n",), None, None, None, None, "f.jsonl:9")]
    with pytest.raises(InputError, match="f.jsonl:9: field 'pos_scores'"):
        make_loader(unscored, tokenizer)
    with pytest.raises(InputError, match="cannot|no length bucket"):
        make_loader(records[:5], tokenizer)
    with pytest.raises(ValueError, match="not a multiple of process_count 3"):
        make_loader(records, tokenizer, process_index=0, process_count=3)
