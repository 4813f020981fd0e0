"""Prepared data: `data prepare` writes ArrayRecord shards whose windows equal a NumPy packing of the
same documents, resumes after a kill, streams per host with a resumable iterator, trains, and
refuses bad input in one line."""

import gzip
import json
import re
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ladder_jax import checkpoint as ckpt
from ladder_jax import cli
from ladder_jax.config import replace
from ladder_jax.data import (
    DataError,
    PackedWindows,
    build_datasets,
    load_documents,
    open_prepared,
    split_documents,
    train_iterator,
)
from ladder_jax.prepare import prepare
from ladder_jax.tokenizer import ByteTokenizer, HFTokenizer
from ladder_jax.training import train

from .conftest import small_config

SEQ = 32
BYTES = ByteTokenizer()
quiet = dict(progress=False, log=lambda *_: None)


def reference_windows(docs: list[bytes], seq: int) -> list[dict]:
    """Every window of BOS doc EOS ... laid back to back, from one concatenated NumPy stream."""
    stream = np.concatenate([np.r_[256, np.frombuffer(d, np.uint8).astype(int), 257] for d in docs]).astype(np.int32)
    doc_of = np.concatenate([np.full(len(d) + 2, k) for k, d in enumerate(docs)])
    out = []
    for i in range((len(stream) - 1) // seq):
        w, seg = stream[i * seq : i * seq + seq + 1], doc_of[i * seq : i * seq + seq + 1]
        positions = np.zeros(seq, np.int32)
        for t in range(1, seq):
            positions[t] = positions[t - 1] + 1 if seg[t] == seg[t - 1] else 0
        same = (seg[:-1][:, None] == seg[:-1][None, :]).astype(int)
        out.append(
            {"inputs": w[:-1], "targets": w[1:], "positions": positions, "same": same, "mask": seg[1:] == seg[:-1]}
        )
    return out


def assert_windows_equal(windows: PackedWindows, reference: list[dict]):
    assert len(windows) == len(reference)
    for i, ref in enumerate(reference):
        got = windows[i]
        np.testing.assert_array_equal(got["inputs"], ref["inputs"])
        np.testing.assert_array_equal(got["targets"], ref["targets"])
        np.testing.assert_array_equal(got["positions"], ref["positions"])
        np.testing.assert_array_equal(got["mask"], ref["mask"].astype(np.float32))
        seg = got["segment_ids"]
        np.testing.assert_array_equal(seg[:, None] == seg[None, :], ref["same"].astype(bool))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text files, a gzipped JSONL and a Parquet file of two row groups; documents of 1 to 300 bytes."""
    d = tmp_path_factory.mktemp("raw")
    rng = np.random.RandomState(0)
    text = lambda n: "".join(rng.choice(list("abcdefgh ij\n"), n))  # noqa: E731
    for k in range(6):
        (d / f"t{k}.txt").write_text(text(rng.randint(1, 300)))
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        for _ in range(60):
            f.write(json.dumps({"text": text(rng.randint(1, 120)), "id": 1}) + "\n\n")
    pq.write_table(
        pa.table({"body": [text(rng.randint(1, 80)) for _ in range(50)]}), d / "b.parquet", row_group_size=25
    )
    return d


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    inputs = [str(corpus / "*.txt"), str(corpus / "a.jsonl.gz")]
    prepare(inputs, out, BYTES, workers=2, val_fraction=0.2, **quiet)
    return out, inputs


def test_prepared_windows_equal_a_numpy_packing_and_the_in_memory_pipeline(prepared):
    out, inputs = prepared
    docs = load_documents(",".join(inputs))
    train_docs, val_docs = split_documents(docs, 0.2)
    assert len(val_docs) > 2 and len(train_docs) > 40
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ref = reference_windows([d.text.encode() for d in split_docs], SEQ)
        assert_windows_equal(open_prepared(out, split, BYTES, SEQ), ref)
    cfg = small_config(train__data=",".join(inputs), train__val_fraction=0.2, train__batch_size=8).train
    assert_windows_equal(
        build_datasets(cfg, BYTES).train, reference_windows([d.text.encode() for d in train_docs], SEQ)
    )


def test_parquet_and_a_tokenizer_json(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *"abcdefghij"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path / "tokenizer.json", bos_id=1, eos_id=2, pad_id=0)
    manifest = prepare([str(corpus / "b.parquet")], tmp_path / "out", hf, "body", val_fraction=0, **quiet)
    assert manifest["splits"]["train"]["documents"] == 50 and len(manifest["splits"]["train"]["shards"]) == 2
    rows = pq.read_table(corpus / "b.parquet").column("body").to_pylist()
    windows = open_prepared(tmp_path / "out", "train", hf, SEQ)
    stream = np.concatenate([[1, *hf.encode(r), 2] for r in rows])
    np.testing.assert_array_equal(windows[3]["inputs"], stream[3 * SEQ : 4 * SEQ])
    assert len(open_prepared(tmp_path / "out", "val", hf, SEQ)) == 0  # --val-fraction 0: no validation
    with pytest.raises(DataError, match="another tokenizer than the model's .*fingerprint .*vocab_size 13 vs 259"):
        open_prepared(tmp_path / "out", "train", BYTES, SEQ)


def test_a_killed_prepare_is_refused_and_a_rerun_keeps_the_finished_shards(prepared, tmp_path):
    out, inputs = prepared
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    # As a kill leaves it: the last unit half written (temporary shard, no record), no manifest.
    (copy / "manifest.json").unlink()
    (copy / "unit-00001.json").unlink()
    (copy / "train-00001.arrayrecord").rename(copy / "train-00001.arrayrecord.tmp")
    with pytest.raises(DataError, match="has no manifest.json: its prepare did not finish; rerun"):
        open_prepared(copy, "train", BYTES, SEQ)
    kept = (copy / "train-00000.arrayrecord").stat().st_mtime_ns
    notes = []
    prepare(inputs, copy, BYTES, workers=1, val_fraction=0.2, progress=False, log=notes.append)
    assert notes[0].endswith("1 of 2 units already done, preparing the other 1")
    assert (copy / "train-00000.arrayrecord").stat().st_mtime_ns == kept
    assert json.loads((copy / "manifest.json").read_text()) == json.loads((out / "manifest.json").read_text())
    with pytest.raises(DataError, match="holds a prepare with other inputs"):
        prepare(inputs, copy, BYTES, workers=1, val_fraction=0.1, **quiet)


def test_a_rerun_redoes_a_unit_whose_input_changed_and_keeps_the_others(corpus, tmp_path):
    # Two units: the text files, and the JSONL; the JSONL changes between the runs.
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in [*corpus.glob("*.txt"), corpus / "a.jsonl.gz"]:
        shutil.copy(f, raw / f.name)
    inputs = [str(raw / "*.txt"), str(raw / "a.jsonl.gz")]
    out = tmp_path / "out"
    prepare(inputs, out, BYTES, workers=1, val_fraction=0.2, **quiet)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*-00000.arrayrecord")}
    with gzip.open(raw / "a.jsonl.gz", "wt") as f:
        for k in range(40):
            f.write(json.dumps({"text": f"a changed document {k} " * (k % 5 + 1)}) + "\n")
    notes = []
    prepare(inputs, out, BYTES, workers=1, val_fraction=0.2, progress=False, log=notes.append)
    assert notes[0].endswith("1 of 2 units already done, preparing the other 1")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-00000.arrayrecord")} == kept
    # The same windows as a NumPy packing of the documents now in the inputs.
    train_docs, val_docs = split_documents(load_documents(",".join(inputs)), 0.2)
    assert any("a changed document" in d.text for d in train_docs)
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        assert_windows_equal(
            open_prepared(out, split, BYTES, SEQ), reference_windows([d.text.encode() for d in split_docs], SEQ)
        )


def test_hosts_split_the_batches_and_the_iterator_resumes(prepared):
    windows = open_prepared(prepared[0], "train", BYTES, SEQ)
    it = train_iterator(windows, 8, seed=3)
    whole = [next(it) for _ in range(3)]
    state = it.get_state()
    after = [next(it)["inputs"] for _ in range(2)]
    it = train_iterator(windows, 8, seed=3)
    it.set_state(state)
    np.testing.assert_array_equal(np.stack([next(it)["inputs"] for _ in range(2)]), np.stack(after))
    hosts = [train_iterator(windows, 8, 3, p, 2) for p in range(2)]
    for batch in whole:  # the two hosts' rows are the one-host batch's rows
        rows = np.concatenate([next(h)["inputs"] for h in hosts])
        assert sorted(map(bytes, rows)) == sorted(map(bytes, batch["inputs"]))


def test_training_on_a_prepared_directory_checkpoints_the_iterator(prepared, tmp_path, devices):
    cfg = small_config(
        "standard", 1, 1, model__n_layers=1, train__data=str(prepared[0]), train__batch_size=8, train__steps=3
    )
    assert np.isfinite(train(cfg, tmp_path / "run", stop_at=2, **quiet)["loss"])
    # The checkpoint's iterator state, restored into a fresh iterator, goes on with the third batch.
    windows = open_prepared(prepared[0], "train", BYTES, SEQ)
    it = train_iterator(windows, 8, cfg.train.seed)
    third = [next(it) for _ in range(3)][-1]
    it = train_iterator(windows, 8, cfg.train.seed)
    ckpt.manager(tmp_path / "run").restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
    np.testing.assert_array_equal(next(it)["inputs"], third["inputs"])
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(DataError, match="has no manifest.json"):
        train(replace(cfg, train={"data": str(tmp_path / "unfinished")}), tmp_path / "other", **quiet)


def test_a_refused_split_leaves_nothing_that_blocks_a_rerun(prepared, tmp_path):
    (tmp_path / "one.txt").write_text("a single document")
    inputs, out = [str(tmp_path / "one.txt")], tmp_path / "out"
    with pytest.raises(DataError, match="held out none of the 1 documents; rerun with a larger --val-fraction"):
        prepare(inputs, out, BYTES, workers=1, val_fraction=0.0001, **quiet)
    notes = []
    manifest = prepare(inputs, out, BYTES, workers=1, val_fraction=0, progress=False, log=notes.append)
    assert manifest["splits"]["train"]["documents"] == 1 and manifest["val_fraction"] == 0
    assert not any("already done" in n for n in notes)  # the refused prepare's unit is redone, not reused
    # A finished prepare's directory is still refused to other options, and left as it was.
    kept = {p.name: p.stat().st_mtime_ns for p in prepared[0].iterdir()}
    with pytest.raises(DataError, match="holds a prepare with other inputs"):
        prepare(prepared[1], prepared[0], BYTES, workers=1, val_fraction=0.0001, **quiet)
    assert {p.name: p.stat().st_mtime_ns for p in prepared[0].iterdir()} == kept


def test_bad_input_is_one_line(prepared, corpus, tmp_path, capsys):
    out, inputs = prepared
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    # Which unit's shards hold validation documents depends on their names (a hash), so take the
    # shards the manifest lists.
    manifest = json.loads((broken / "manifest.json").read_text())
    val_shard, train_shard = (manifest["splits"][s]["shards"][0]["path"] for s in ("val", "train"))
    (broken / val_shard).unlink()
    with pytest.raises(DataError, match=rf"shard .*{val_shard} is missing"):
        open_prepared(broken, "val", BYTES, SEQ)
    path = broken / train_shard
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"{train_shard} has \d+ bytes, the manifest says \d+ \(truncated\)"):
        open_prepared(broken, "train", BYTES, SEQ)
    manifest["splits"]["train"].update(documents=0, shards=[])
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="the train split of .* is empty; prepare it from more documents"):
        open_prepared(broken, "train", BYTES, SEQ)

    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": oops}\n')
    (tmp_path / "blank.txt").write_text(" \n")
    (tmp_path / "two.txt").write_text("two documents only")
    cases = [
        ([str(tmp_path / "bad.jsonl")], "bad.jsonl:3 is not valid JSON"),
        ([str(corpus / "b.parquet")], "b.parquet has no column 'text' \\(it has body\\); name the text column"),
        ([str(tmp_path / "blank.txt")], "holds no text"),
        ([str(tmp_path / "two.txt"), str(corpus / "t0.txt"), "--val-fraction", "0.001"], "held out none of the 2"),
        ([str(tmp_path / "none*.txt")], "matches no file"),
        ([str(corpus / "t0.txt"), "--out", str(tmp_path / "two.txt")], r"--out .*two\.txt is a file, not a directory"),
        ([str(corpus / "t0.txt"), "--out", "/proc/prepared"], r"cannot create --out /proc/prepared \("),
    ]
    for k, (args, message) in enumerate(cases):
        out = [] if "--out" in args else ["--out", str(tmp_path / f"o{k}")]
        assert cli.main(["data", "prepare", *args, *out, "--workers", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert re.search(message, err), err
    assert (tmp_path / "two.txt").read_text() == "two documents only"


def test_each_process_reads_only_its_own_shards(prepared):
    out = prepared[0]
    shards = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) == 2  # the text files are one unit, the JSONL another
    whole = open_prepared(out, "train", BYTES, SEQ)  # checked against a NumPy packing above
    first = np.cumsum([0] + [s["documents"] for s in shards])
    for p in range(2):
        mine = open_prepared(out, "train", BYTES, SEQ, host=(p, 2))
        texts = [
            bytes(whole.documents[d][1:-1].astype(np.uint8))
            for k in range(p, len(shards), 2)
            for d in range(first[k], first[k + 1])
        ]
        assert mine.host_local and len(mine.documents) == len(texts)
        assert_windows_equal(mine, reference_windows(texts, SEQ))
        it = train_iterator(mine, 8, 3, p, 2)  # its windows are its own: not split again
        assert next(it)["inputs"].shape == (4, SEQ)
    with pytest.raises(DataError, match=f"has {len(shards)} shards for {len(shards) + 1} processes"):
        open_prepared(out, "train", BYTES, SEQ, host=(len(shards), len(shards) + 1))
