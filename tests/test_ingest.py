"""Ingest end to end: real mp4 files (good and broken) through a local Ray cluster, in parquet
mode (shards + manifest + rejects, resume) and online mode; counts must reconcile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import sample_mp4, tiny_bundle

from dcm import latents as lt
from dcm.config import ConfigError, load_config
from dcm.decode import decode_clips, to_pixels
from pipelines import ingest
from pipelines.ingest.decode import decode_one

GOOD = {"good0.mp4": 40, "good1.mp4": 17, "good2.mp4": 21, "good3.mp4": 17}  # name -> frames


def _ffmpeg(*args: str) -> None:
    import subprocess

    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args], check=True)


def _broken_files(d: Path) -> None:
    data = (d / "good0.mp4").read_bytes()
    (d / "zero.mp4").write_bytes(b"")
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "notes.mp4").write_text("not a video\n" * 40)
    sample_mp4(d / "short.mp4", num_frames=5, height=48, width=80)
    _ffmpeg(
        "-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(d / "audio.m4a")
    )
    # index up front, second half of the stream garbled: opens, then fails to decode
    fast = d / "fast.tmp"
    _ffmpeg(
        "-i", str(d / "good0.mp4"), "-c", "copy", "-movflags", "+faststart", "-f", "mp4", str(fast)
    )
    raw = bytearray(fast.read_bytes())
    raw[len(raw) // 3 :] = np.random.default_rng(0).bytes(len(raw) - len(raw) // 3)
    (d / "corrupt.mp4").write_bytes(bytes(raw))
    fast.unlink()


EXPECTED_REJECTS = {
    "zero.mp4": "empty file",
    "truncated.mp4": "not a readable video",
    "notes.mp4": "not a readable video",
    "short.mp4": "too short",
    "audio.m4a": "audio-only",
    "missing.mp4": "missing file",
    "corrupt.mp4": "corrupt",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A bundle, a manifest dataset (relative paths, broken files, bad lines) and a folder
    dataset with sidecar captions."""
    root = tmp_path_factory.mktemp("ingest")
    vids = root / "vids"
    vids.mkdir()
    for name, frames in GOOD.items():
        sample_mp4(vids / name, num_frames=frames, height=48, width=80)
    _broken_files(vids)
    lines = [
        json.dumps({"path": f"vids/{n}", "caption": f"a red square moves right {i}"})
        for i, n in enumerate(GOOD)
    ]
    lines[1] = json.dumps({"path": str(vids / "good1.mp4"), "caption": "an absolute path"})
    for name in EXPECTED_REJECTS:
        lines.append(json.dumps({"path": f"vids/{name}", "caption": "broken"}))
    lines.append(json.dumps({"path": "vids/good3.mp4", "caption": "   "}))  # empty caption
    lines.append('{"path": "vids/good3.mp4", "caption": "caf\xe9"}')  # latin-1 byte below
    lines.append("{not json")
    lines.append(json.dumps({"caption": "no path"}))
    # the "café" line in latin-1, as a non-UTF-8 caption
    raw = ("\n".join(lines) + "\n\n").encode().replace("café".encode(), b"caf\xe9")
    (root / "captions.jsonl").write_bytes(raw)

    folder = root / "folder"
    folder.mkdir()
    for i, name in enumerate(("a.mp4", "b.mp4", "c.mp4")):
        sample_mp4(folder / name, num_frames=17, height=64, width=64)
        (folder / name).with_suffix(".txt").write_text(f"a red square {i}\n")
    sample_mp4(folder / "nocaption.mp4", num_frames=17)
    sample_mp4(folder / "latin.mp4", num_frames=17)
    (folder / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "orphan.txt").write_text("a caption without its video")
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "zero.txt").write_text("zero")
    (folder / ".hidden").write_text("ignored")
    return {
        "root": root,
        "bundle": tiny_bundle(tmp_path_factory),
        "manifest": root / "captions.jsonl",
        "folder": folder,
    }


def _cfg(world, out: Path, data_input: Path, *extra: str):
    return load_config(
        None,
        "shapes-tiny",
        [
            f"model.path={world['bundle']}",
            f"data.input={data_input}",
            f"ingest.out={out}",
            "data.posterior=mean",
            "data.clips_per_video=2",
            "ingest.rows_per_shard=4",
            "ingest.encode_batch_size=2",
            *extra,
        ],
    )


# ---------------------------------------------------------------- listing (no Ray)
def test_jsonl_listing_resolves_paths_and_flags_bad_lines(world):
    uri, kind = ingest.check_input(str(world["root"]))  # a folder holding captions.jsonl
    assert (uri, kind) == (str(world["manifest"]), "jsonl")
    rows = list(ingest.iter_sources(uri, kind))
    assert len(rows) == 15
    assert rows[0]["source"] == str(world["root"] / "vids" / "good0.mp4")
    assert rows[1]["source"] == str(world["root"] / "vids" / "good1.mp4")
    assert "\ufffd" in rows[12]["caption"]  # the latin-1 byte, left for decode to reject
    assert rows[13]["error"] == "captions.jsonl line 14 is not valid JSON"
    assert rows[14]["error"] == "captions.jsonl line 15 has no 'path'"


def test_uri_inputs_list_and_decode(world):
    """Any pyarrow file-system URI works like a local path (file:// here; s3:// alike)."""
    uri, kind = ingest.check_input(f"file://{world['manifest']}")
    rows = list(ingest.iter_sources(uri, kind))
    assert rows[0]["source"] == f"file://{world['root']}/vids/good0.mp4"
    geometry = {"num_frames": 17, "height": 64, "width": 64, "target_fps": 0.0, "clips": 2}
    clips, caption = decode_one(rows[0], geometry)
    assert len(clips) == 2 and clips[0].shape == (17, 64, 64, 3) and caption.startswith("a red")


def test_csv_and_parquet_manifests(tmp_path):
    (tmp_path / "m.csv").write_bytes(
        b"path,caption,start,end\nv/a.mp4,first,1.5,\nv/b.mp4,caf\xe9,,\nv/c.mp4,x,y,z,extra\n"
        b"v/d.mp4,fourth,,3\n"
    )
    rows = list(ingest.iter_sources(*ingest.check_input(str(tmp_path / "m.csv"))))
    assert [r["source"].rsplit("/", 1)[-1] if not r["error"] else r["error"] for r in rows] == [
        "a.mp4",
        "b.mp4",
        "d.mp4",
        "m.csv line 4 has the wrong number of fields",
    ]
    assert rows[0]["start"] == 1.5 and math.isnan(rows[0]["end"]) and rows[2]["end"] == 3.0
    assert "\ufffd" in rows[1]["caption"]
    table = pa.table(
        {"path": ["s3://bucket/x.mp4", "y.mp4"], "caption": ["one", None], "fps": [8.0, None]}
    )
    pq.write_table(table, tmp_path / "m.parquet")
    rows = list(ingest.iter_sources(*ingest.check_input(str(tmp_path / "m.parquet"))))
    assert rows[0]["source"] == "s3://bucket/x.mp4" and rows[0]["fps"] == 8.0
    assert rows[1]["source"] == str(tmp_path / "y.mp4") and rows[1]["caption"] is None


def test_folder_listing_pairs_sidecars(world):
    rows = list(ingest.iter_sources(*ingest.check_input(str(world["folder"]))))
    names = [Path(r["source"]).name for r in rows]
    assert names == [
        "a.mp4",
        "b.mp4",
        "c.mp4",
        "latin.mp4",
        "nocaption.mp4",
        "orphan.txt",
        "zero.mp4",
    ]
    assert rows[0]["caption_file"] == str(world["folder"] / "a.txt")
    assert rows[5]["error"] == "caption file without a video of the same name"


@pytest.mark.parametrize(
    "value, match",
    [
        ("", "data.input is empty"),
        ("/nonexistent/x.jsonl", "does not exist"),
        (__file__, "not a manifest"),
    ],
)
def test_bad_input_is_one_clear_error(value, match):
    with pytest.raises(ConfigError, match=match):
        ingest.check_input(value)


def test_cli_dry_run_and_user_errors(capsys, tmp_path):
    from pipelines.args import run_main

    with pytest.raises(SystemExit) as stop:
        ingest.main(["--input", "data.jsonl", "--out", str(tmp_path), "--dry-run"])
    assert stop.value.code == 0
    assert "input: data.jsonl" in capsys.readouterr().out
    assert run_main(ingest.main, ["--input", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- parquet mode
class Interrupted(Exception):
    """Stands for a driver killed mid-run."""


@pytest.fixture(scope="module")
def interrupted(world, ray_cluster, tmp_path_factory):
    """A parquet run interrupted after its first finished group (the driver's parquet writes
    recorded: shards must come from the writer tasks, never from here)."""
    import pipelines.ingest.run as run

    out = tmp_path_factory.mktemp("latents")
    cfg = _cfg(world, out, world["manifest"])
    driver_writes: list[str] = []
    real_close = run.close_group

    def close_once(*args, **kwargs):
        if list((out / ingest.STATE_DIR).glob("done-*.json")):
            raise Interrupted
        return real_close(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lt, "write_table", _recording(lt.write_table, driver_writes))
        mp.setattr(run, "close_group", close_once)
        with pytest.raises(Interrupted):
            ingest.run_ingest(cfg)
    done = {p.name: json.loads(p.read_text()) for p in (out / ingest.STATE_DIR).glob("done-*")}
    kept = {
        f["file"]: (out / f["file"]).stat().st_mtime_ns for r in done.values() for f in r["files"]
    }
    return {"cfg": cfg, "out": out, "done": done, "kept": kept, "driver_writes": driver_writes}


@pytest.fixture(scope="module")
def parquet_run(interrupted):
    """The interrupted run resumed (its own test's time budget: two runs do not fit one)."""
    cfg, out = interrupted["cfg"], interrupted["out"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lt, "write_table", _recording(lt.write_table, interrupted["driver_writes"]))
        summary = ingest.run_ingest(cfg)
    return cfg, out, summary, interrupted


def _recording(write, paths):
    def record_write(fs, path, table):
        paths.append(path)
        write(fs, path, table)

    return record_write


@pytest.mark.timeout(240)
def test_interrupted_run_keeps_its_finished_groups(interrupted):
    out = interrupted["out"]
    assert len(interrupted["done"]) >= 1 and interrupted["kept"]
    for name in interrupted["kept"]:
        assert (out / name).is_file()
    assert not (out / lt.MANIFEST).exists()  # the folder is not finished


@pytest.mark.timeout(240)
def test_parquet_mode_counts_reconcile(parquet_run):
    cfg, out, summary, _ = parquet_run
    assert summary.reconciled
    # good0 has 40 frames -> 2 clips; good1-3 one each; 15 inputs, 4 videos, 11 rejects
    assert (summary.inputs, summary.videos, summary.clips, summary.rejects) == (15, 4, 5, 11)
    manifest = lt.read_manifest(out)
    assert manifest.counts["inputs"] == 15 and manifest.counts["clips"] == 5
    assert manifest.latent_shape == (8, 5, 16, 16) and manifest.text_shape == (24, 32)
    assert manifest.normalisation["kind"] == "per_channel"
    assert (
        manifest.encoder["model"] == str(cfg.model.path)
        and manifest.encoder["vae"] == "AutoencoderKLWan"
    )
    assert sum(s["rows"] for s in manifest.shards) == 5
    rejects = {Path(r["path"]).name: r["reason"] for r in lt.read_rejects(out)}
    for name, reason in EXPECTED_REJECTS.items():
        assert reason in rejects[name], (name, rejects[name])
    reasons = [r["reason"] for r in lt.read_rejects(out)]
    assert any("caption is empty" in r for r in reasons)
    assert any("not valid UTF-8" in r for r in reasons)
    assert "captions.jsonl line 14 is not valid JSON" in reasons


@pytest.mark.timeout(240)
def test_parquet_rows_are_the_encoders_output(parquet_run, world):
    from dcm.bundle import load_bundle

    cfg, out, _, _ = parquet_run
    rows = {}
    for batch in ingest.read_latents(out).iter_batches(batch_size=None, batch_format="numpy"):
        assert set(batch) == set(lt.COLUMNS)
        for i in range(len(batch["clip"])):
            rows[(Path(batch["source"][i]).name, int(batch["clip"][i]))] = {
                k: batch[k][i] for k in batch
            }
    assert sorted(rows) == [
        ("good0.mp4", 0),
        ("good0.mp4", 1),
        ("good1.mp4", 0),
        ("good2.mp4", 0),
        ("good3.mp4", 0),
    ]
    row = rows[("good0.mp4", 1)]
    assert row["latents"].shape == (8, 5, 16, 16) and row["latents"].dtype == np.float32
    assert row["text"].shape == (24, 32) and row["text_mask"].dtype == np.int8
    # The same clip encoded directly (mean posterior) gives the stored RAW latents.
    bundle = load_bundle(world["bundle"], text_max_length=cfg.model.text_max_length)
    clip = decode_clips(world["root"] / "vids" / "good0.mp4", 17, 64, 64, clips=2).clips[1]
    z = bundle.encode_video(to_pixels(clip[None]), posterior="mean")[0]
    np.testing.assert_allclose(row["latents"], z.numpy(), atol=1e-4)
    cond = bundle.encode_text([str(row["caption"])])
    np.testing.assert_allclose(row["text"], cond.text[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(row["text_mask"], cond.mask[0].numpy())
    text, mask = lt.read_empty_prompt(out)
    null = bundle.null_cond(1)
    np.testing.assert_allclose(text, null.text[0].numpy(), atol=1e-5)
    assert mask.sum() == null.mask.sum()


@pytest.mark.timeout(240)
def test_resume_after_interruption_loses_nothing(parquet_run):
    """The interrupted run's finished groups are kept as they were (same files, untouched)
    and skipped; the resumed folder holds every clip exactly once."""
    cfg, out, summary, first = parquet_run
    assert len(first["done"]) >= 1 and summary.resumed_groups == len(first["done"])
    manifest = lt.read_manifest(out)
    listed = [s["file"] for s in manifest.shards]
    for name, mtime in first["kept"].items():
        assert name in listed and (out / name).stat().st_mtime_ns == mtime
    clips = []
    for path in lt.shard_paths(out, manifest):
        table = pq.read_table(path, columns=["source", "clip"])
        clips += [(Path(s).name, c) for s, c in zip(*table.to_pydict().values(), strict=True)]
    assert sorted(clips) == [
        ("good0.mp4", 0), ("good0.mp4", 1), ("good1.mp4", 0), ("good2.mp4", 0), ("good3.mp4", 0)
    ]  # fmt: skip
    # no shard file on disk outside the manifest (the interrupted run's partial groups went)
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == sorted(listed)
    # other settings into the same folder: one clear error, nothing overwritten
    with pytest.raises(ConfigError, match="data.num_frames"):
        ingest.run_ingest(cfg.replace(**{"data.num_frames": 9}))


@pytest.mark.timeout(240)
def test_shards_are_written_by_workers_not_the_driver(parquet_run):
    import os

    import ray

    _, out, _, first = parquet_run
    assert not [p for p in first["driver_writes"] if "shard-" in p]  # only the small tables
    assert {Path(p).name for p in first["driver_writes"]} <= {lt.REJECTS, lt.EMPTY_PROMPT}
    files = [f for p in (out / ingest.STATE_DIR).glob("done-*.json") for f in
             json.loads(p.read_text())["files"]]  # fmt: skip
    assert len(files) == len(lt.read_manifest(out).shards) >= 2
    for f in files:  # the process that wrote each shard: a Ray worker on this cluster's node
        assert f["pid"] != os.getpid() and f["pid"] > 0
        assert f["node"] == ray.get_runtime_context().get_node_id()


# ---------------------------------------------------------------- online mode
@pytest.mark.timeout(240)
def test_online_stream_reconciles_and_logs_rejects(world, ray_cluster, tmp_path):
    cfg = _cfg(world, tmp_path / "online", world["folder"], "data.clips_per_video=1")
    ds = ingest.stream_latents(cfg)
    n = 0
    for batch in ds.iter_batches(batch_size=2, batch_format="numpy"):
        assert set(batch) == set(lt.COLUMNS)
        assert batch["latents"].shape[1:] == (8, 5, 16, 16) and batch["latents"].dtype == np.float32
        assert batch["text"].shape[1:] == (24, 32) and batch["text_mask"].dtype == np.int8
        n += len(batch["clip"])
    s = ingest.stream_summary(ds)
    assert n == 3 and s["inputs"] == 7 and s["videos"] == 3
    assert s["inputs"] == s["videos"] + len(s["rejects"])
    reasons = {Path(r["path"]).name: r["reason"] for r in s["rejects"]}
    assert reasons == {
        "latin.mp4": "caption file is not valid UTF-8 (byte 3): re-save it as UTF-8",
        "nocaption.mp4": "missing caption file nocaption.txt",
        "orphan.txt": "caption file without a video of the same name",
        "zero.mp4": "empty file (0 bytes)",
    }
    side = lt.read_rejects(tmp_path / "online")  # the side file of online mode
    assert sorted(r["path"] for r in side) == sorted(r["path"] for r in s["rejects"])


# ---------------------------------------------------------------- the row schema (no Ray)
def test_latent_rows_round_trip_through_arrow(tmp_path):
    rng = np.random.default_rng(0)
    rows = {
        "latents": rng.standard_normal((3, 4, 2, 3, 5)).astype(np.float32),  # (B, C, T, h, w)
        "text": rng.standard_normal((3, 6, 7)).astype(np.float32),  # (B, L, D)
        "text_mask": (rng.random((3, 6)) > 0.5).astype(np.int8),  # (B, L)
        "caption": np.asarray(["a", "b", "c"], dtype=object),
        "source": np.asarray(["s3://x/1.mp4", "/y/2.mp4", "/y/2.mp4"], dtype=object),
        "clip": np.asarray([0, 0, 1], dtype=np.int32),
    }
    table = lt.rows_to_table(rows)
    pq.write_table(table, tmp_path / "shard.parquet")
    back = lt.table_to_rows(pq.read_table(tmp_path / "shard.parquet"), (4, 2, 3, 5), (6, 7))
    for key, value in rows.items():
        np.testing.assert_array_equal(back[key], value)
        assert back[key].dtype == value.dtype
    with pytest.raises(lt.LatentsError, match="mixes runs"):
        lt.table_to_rows(table, (4, 2, 3, 6), (6, 7))
    with pytest.raises(lt.LatentsError, match="lack the columns"):
        lt.rows_to_table({k: v for k, v in rows.items() if k != "text"})


def test_manifest_errors_name_the_folder(tmp_path):
    with pytest.raises(lt.LatentsError, match="has no manifest.json"):
        lt.read_manifest(tmp_path)
    m = lt.LatentManifest(
        encoder={"model": "m"}, normalisation={"kind": "scale", "scaling_factor": 0.5},
        latent_shape=(16, 21, 60, 104), text_shape=(512, 4096), video={"num_frames": 81},
        counts={"inputs": 1}, shards=[{"file": "shard-00000.parquet", "rows": 1}],
    )  # fmt: skip
    lt.write_manifest(tmp_path, m)
    again = lt.read_manifest(tmp_path)
    assert again.latent_shape == (16, 21, 60, 104) and again.shards == m.shards
    assert lt.shard_paths(tmp_path) == [f"{tmp_path}/shard-00000.parquet"]
    data = json.loads((tmp_path / lt.MANIFEST).read_text())
    (tmp_path / lt.MANIFEST).write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(lt.LatentsError, match="schema_version 99"):
        lt.read_manifest(tmp_path)
    (tmp_path / lt.MANIFEST).write_text("{")
    with pytest.raises(lt.LatentsError, match="not valid JSON"):
        lt.read_manifest(tmp_path)


@pytest.mark.ray
def test_nan_latents_reject_only_their_clip(ray_cluster, tmp_path_factory):
    """A VAE that returns NaN for one clip (a corrupt clip, or bf16 overflow) would poison
    every training step that draws it: the encoder's row-by-row retry rejects that clip,
    with a reason naming the fix, and keeps the others."""
    import ray

    from pipelines.ingest.encoder import Encoder
    from pipelines.ingest.ledger import make_ledger

    cfg = load_config(preset="shapes-tiny")
    model = {
        "path": str(tiny_bundle(tmp_path_factory)), "dtype": "float32", "gpus": 0,
        "posterior": cfg.data.posterior, "seed": 0, "text_max_length": cfg.model.text_max_length,
    }  # fmt: skip
    ledger = make_ledger(4)
    enc = Encoder(model, ledger, keep_index=True)
    real = enc.bundle.encode_video
    import torch

    def white_clips_overflow(pixels, posterior, gen):  # the all-white clip comes back NaN
        z = real(pixels, posterior, gen)
        white = pixels.flatten(1).min(dim=1).values > 0.99  # (B,)
        return torch.where(white[:, None, None, None, None], torch.nan, z)

    enc.bundle.encode_video = white_clips_overflow
    frames = np.zeros((3, 17, 64, 64, 3), np.uint8)
    frames[0] = 40
    frames[1] = 255  # the clip whose latents overflow
    batch = {
        "frames": frames, "caption": np.asarray(["a", "b", "c"], dtype=object),
        "index": np.arange(3), "clip": np.zeros(3, np.int32),
        "source": np.asarray(["v0.mp4", "v1.mp4", "v2.mp4"], dtype=object),
    }  # fmt: skip
    out = list(enc(batch))
    assert len(out) == 1 and list(out[0]["source"]) == ["v0.mp4", "v2.mp4"]
    assert np.isfinite(out[0]["latents"]).all() and out[0]["latents"].shape[0] == 2
    rejects = ray.get(ledger.summary.remote())["rejects"]
    assert [r["source"] for r in rejects] == ["v1.mp4"]
    assert "NaN or inf" in rejects[0]["reason"] and "model.dtype=float32" in rejects[0]["reason"]
