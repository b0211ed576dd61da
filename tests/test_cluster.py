"""Folder labelling on a real Dask LocalCluster of worker processes (loopback only): the same
mask bytes as the single process, --resume across both paths, and a worker killed mid-run."""

import csv
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from napari_vlsm.cli import app

from .conftest import copy_images

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory, kvasir):
    return copy_images(kvasir, tmp_path_factory.mktemp("cluster") / "frames", 12)


@pytest.fixture(scope="module")
def cluster():
    from napari_vlsm.core.inference.cluster import local_cluster

    with local_cluster(2) as c:
        yield c


@pytest.fixture(scope="module")
def single(images, tiny_unet, tmp_path_factory):
    """The single-process run's masks: what every cluster run must write, byte for byte."""
    out = tmp_path_factory.mktemp("single") / "masks"
    res = runner.invoke(app, ["segment", str(images), "-p", "polyp", "--model", str(tiny_unet), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


def mask_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def report(folder: Path) -> list[dict]:
    return list(csv.DictReader(open(folder / "segment_report.csv", newline="")))


def test_a_local_cluster_writes_the_single_process_masks(images, tiny_unet, single, tmp_path):
    out = tmp_path / "masks"
    res = runner.invoke(app, ["segment", str(images), "-p", "polyp", "--model", str(tiny_unet), "-o", str(out),
                              "--cluster", "local:2"])
    assert res.exit_code == 0, res.output
    assert "12 segmented" in res.output
    assert len(mask_bytes(single)) == 12 and mask_bytes(out) == mask_bytes(single)
    assert (out / "labels.json").read_text() == (single / "labels.json").read_text()


def test_resume_on_a_scheduler_goes_on_from_a_single_process_run(images, tiny_unet, single, cluster, tmp_path):
    out = tmp_path / "masks"
    res = runner.invoke(app, ["segment", str(images), "-p", "polyp", "--model", str(tiny_unet), "-o", str(out)])
    assert res.exit_code == 0, res.output
    for p in sorted(out.glob("*.png"))[:4]:  # as if the run had stopped before these
        p.unlink()
    res = runner.invoke(app, ["segment", str(images), "-p", "polyp", "--model", str(tiny_unet), "-o", str(out),
                              "--scheduler", cluster.scheduler_address, "--resume"])
    assert res.exit_code == 0, res.output
    assert "4 segmented, 8 skipped" in res.output
    assert mask_bytes(out) == mask_bytes(single)
    assert sorted(r["status"] for r in report(out)) == ["ok"] * 4 + ["skipped"] * 8


class KillOnce(distributed.WorkerPlugin):
    """Kills its worker process the first time a task naming ``name`` starts there."""

    def __init__(self, name: str, flag: str):
        self.name, self.flag = name, flag

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and self.name in str(key) and not os.path.exists(self.flag):
            Path(self.flag).touch()
            os._exit(1)


def segment_with_worker_plugin(cluster, plugin, images, model, out):
    """``segment`` on the cluster's scheduler with ``plugin`` on its workers for the run."""
    with distributed.Client(cluster) as client:
        client.register_plugin(plugin, name="test-plugin")
        try:
            return runner.invoke(app, ["segment", str(images), "-p", "polyp", "--model", str(model), "-o", str(out),
                                       "--scheduler", cluster.scheduler_address])
        finally:
            client.unregister_worker_plugin("test-plugin")


def test_a_worker_killed_mid_run_loses_nothing(images, tiny_unet, single, cluster, tmp_path):
    victim = sorted(images.iterdir())[4].name  # first image of the second task
    flag = tmp_path / "killed"
    res = segment_with_worker_plugin(cluster, KillOnce(victim, str(flag)), images, tiny_unet, tmp_path / "masks")
    assert flag.exists()  # a worker did die on it
    assert res.exit_code == 0, res.output
    rows = report(tmp_path / "masks")
    assert sorted(Path(r["image"]).name for r in rows) == sorted(p.name for p in images.iterdir())  # each once
    assert all(r["status"] == "ok" for r in rows)
    assert mask_bytes(tmp_path / "masks") == mask_bytes(single)
    assert not list((tmp_path / "masks").glob("*.tmp*")) and not list((tmp_path / "masks").glob(".*.png*"))


class KillEveryTime(distributed.WorkerPlugin):
    """Kills its worker process every time a task naming ``name`` starts there, and counts the kills."""

    def __init__(self, name: str, tally: str):
        self.name, self.tally = name, tally

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and self.name in str(key):
            with open(self.tally, "a") as f:
                f.write("killed\n")
            os._exit(1)


@pytest.fixture
def own_cluster():
    """A cluster of its own, for a test that kills a worker again and again: LocalCluster may
    replace a worker that keeps dying with one of a new nanny, which reads Dask's config of the
    moment (the pre-spawn environment) and writes it into this process's environment; so the
    project's pre-spawn environment stays set for the cluster's whole life, and the module's
    cluster is left alone."""
    from napari_vlsm.core.inference.cluster import local_cluster, worker_pre_spawn_environ

    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_pre_spawn_environ()}), local_cluster(2) as c:
        yield c


def test_images_whose_worker_dies_on_every_try_are_reported_failed_not_ok(images, tiny_unet, single, own_cluster,
                                                                         tmp_path):
    """The task of images 4-7 kills its worker each time it starts: after Dask's allowed
    failures it gives up, and those images are failed in the report and the summary, with no
    mask, while the other images are segmented as the single process does."""
    names = sorted(p.name for p in images.iterdir())
    victim = names[4]  # first image of the second task
    tally = tmp_path / "kills"
    res = segment_with_worker_plugin(own_cluster, KillEveryTime(victim, str(tally)), images, tiny_unet,
                                     tmp_path / "masks")
    allowed = dask.config.get("distributed.scheduler.allowed-failures")
    assert len(tally.read_text().splitlines()) == allowed + 1  # it was tried again and again, then given up
    assert res.exit_code == 1, res.output
    rows = {Path(r["image"]).name: r for r in report(tmp_path / "masks")}
    assert sorted(rows) == names  # each image once
    for name in names[4:8]:
        assert rows[name]["status"] == "failed" and "died on every try" in rows[name]["message"], rows[name]
        assert not (tmp_path / "masks" / f"{Path(name).stem}.png").exists()
    ok = [f"{Path(n).stem}.png" for n in names if rows[n]["status"] == "ok"]
    assert ok and all(rows[n]["status"] in ("ok", "failed") for n in names)  # a task sharing the dying worker may fail
    written, right = mask_bytes(tmp_path / "masks"), mask_bytes(single)
    # every image reported ok has its mask; a task that shared the dying worker may have written whole,
    # right masks before the death that failed it (a resume redoes those): nothing written is wrong
    assert set(ok) <= set(written) and all(written[m] == right[m] for m in written)
    assert f"{len(ok)} segmented, 0 skipped (mask existed), {12 - len(ok)} failed" in " ".join(res.output.split())


def test_an_unreadable_image_is_reported_and_the_rest_done(images, tiny_unet, cluster, tmp_path):
    folder = shutil.copytree(images, tmp_path / "frames")
    (folder / "broken.png").write_bytes(b"not a png")
    res = runner.invoke(app, ["segment", str(folder), "-p", "polyp", "--model", str(tiny_unet), "-o",
                              str(tmp_path / "masks"), "--scheduler", cluster.scheduler_address])
    assert res.exit_code == 1 and "12 segmented, 0 skipped (mask existed), 1 failed" in res.output
    assert "broken.png" in res.output and "Traceback" not in res.output


def test_bad_cluster_options_get_messages(images, tmp_path):
    for args, said in ((["--cluster", "local:0"], "local:N"), (["--cluster", "remote"], "local:N"),
                       (["--cluster", "local:1", "--scheduler", "tcp://127.0.0.1:1"], "not both")):
        res = runner.invoke(app, ["segment", str(images), "-p", "polyp", "-o", str(tmp_path / "m"), *args])
        assert res.exit_code != 0 and said in res.output and "Traceback" not in res.output


def test_local_cluster_workers_get_the_clients_allocator_environment(cluster):
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (2.4-2.8x slower for this
    work); the ones --cluster local:N starts have what the client has, and the thread count
    their torch is given."""
    from napari_vlsm.core.inference.cluster import process_environment, slow_worker_note, threads_per_worker

    mine = process_environment()
    with distributed.Client(cluster) as client:
        seen = client.run(process_environment)
        assert len(seen) == 2
        for env in seen.values():
            assert env["allocator"] == mine["allocator"]
            assert "MALLOC_TRIM_THRESHOLD_" not in env["allocator"] or "MALLOC_TRIM_THRESHOLD_" in mine["allocator"]
            assert env["omp"] == str(threads_per_worker(2))
        assert slow_worker_note(client, threads_per_worker(2)) == ""


def test_a_worker_started_with_dasks_defaults_is_reported_once(images, tiny_unet, single, tmp_path, monkeypatch):
    from napari_vlsm.core.inference.cluster import ALLOCATOR_VARS, THREAD_VARS, process_environment

    if "MALLOC_TRIM_THRESHOLD_" in process_environment()["allocator"]:
        pytest.skip("this process itself runs with MALLOC_TRIM_THRESHOLD_ set")
    for name in (*ALLOCATOR_VARS, *THREAD_VARS, "PYTHONHASHSEED"):  # the nanny writes them into this process
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0") as plain:  # as `dask worker` starts one
        res = runner.invoke(app, ["segment", str(images), "-p", "polyp", "--model", str(tiny_unet), "-o",
                                  str(tmp_path / "masks"), "--scheduler", plain.scheduler_address])
    assert res.exit_code == 0, res.output
    assert res.output.count("Note:") == 1 and "MALLOC_TRIM_THRESHOLD_=65536" in res.output, res.output
    assert "1 of 1 Dask workers" in res.output and "docs/performance.md" in res.output
    assert mask_bytes(tmp_path / "masks") == mask_bytes(single)


def test_evaluate_on_a_cluster_gives_the_single_process_scores(kvasir, tiny_unet, cluster, tmp_path):
    from .conftest import small_copy

    data = small_copy(kvasir, tmp_path / "kvasir_seg", 6, 0)  # two tasks of images; the fixture's val has only 4
    base = ["evaluate", str(data), "--split", "train", "--model", str(tiny_unet),
            "--prompt-type", "p7"]  # p7: drawn from a list
    res = runner.invoke(app, [*base, "--csv", str(tmp_path / "alone.csv")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*base, "--csv", str(tmp_path / "cluster.csv"), "--scheduler",
                              cluster.scheduler_address])
    assert res.exit_code == 0, res.output
    alone, spread = (list(csv.DictReader((tmp_path / name).read_text().splitlines()))
                     for name in ("alone.csv", "cluster.csv"))
    assert len(alone) == 6 and spread == alone  # same images, order, prompts and scores
    res = runner.invoke(app, [*base, "--cluster", "local:1", "--scheduler", cluster.scheduler_address])
    assert res.exit_code != 0 and "not both" in res.output
