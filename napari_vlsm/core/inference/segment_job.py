"""One run of labelling a folder, as a generator of outcomes: the job behind ``napari-vlsm
segment``, on this process or on a Dask cluster (``cluster.py``). It holds the output folder,
writes ``labels.json``, segments every image and keeps ``segment_report.csv`` up to date, so a
run stopped anywhere can be resumed from its report."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD
from napari_vlsm.core.inference.cluster import DaskSession, segment_on_cluster
from napari_vlsm.core.inference.folder_labeling import (FileOutcome, OutputLock, segment_files, write_report,
                                                        write_sidecar)
from napari_vlsm.core.models.loading import model_identity

REPORT_EVERY = 50  # results between report rewrites during a long run


def segment_folder(paths: list[Path], prompts: list[str], out_dir, spec: str, threshold: float = DEFAULT_THRESHOLD,
                   resume: bool = False, fmt: str = "png", predictor=None, batch_size: int = 1,
                   cluster: DaskSession | None = None, device: str = "auto", dtype: str = "auto"
                   ) -> Iterator[FileOutcome]:
    """Segment ``paths`` with ``prompts`` into ``out_dir``: with ``predictor`` (a Predictor of
    the model ``spec``) here, ``batch_size`` images a call, or with ``cluster``, whose workers
    load ``spec`` themselves (on ``device``, in ``dtype``). Yields each image's FileOutcome as
    it is done. ``out_dir`` (made if need be) is held for the run (a second run into it raises RuntimeError);
    ``labels.json`` records the prompts, the model and the threshold (a folder made otherwise
    is refused, ValueError); the report is rewritten every REPORT_EVERY results and when the
    run ends, stops with an error or is closed. ``resume``: the images the report lists as done
    are skipped."""
    if (predictor is None) == (cluster is None):
        raise ValueError("Give a predictor or a Dask cluster session, one of them.")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    report: list[FileOutcome] = []
    try:
        with OutputLock(out_dir):
            write_sidecar(out_dir, prompts, model_identity(spec), threshold, resume)
            if cluster is not None:
                outcomes = segment_on_cluster(cluster.client, spec, paths, prompts, out_dir, threshold, resume, fmt,
                                              device, dtype, cluster.threads)
            else:
                outcomes = segment_files(predictor, paths, prompts, out_dir, threshold, resume, fmt, batch_size)
            for res in outcomes:
                report.append(res)
                if len(report) % REPORT_EVERY == 0:  # so a crash leaves a report to resume from
                    write_report(out_dir, report, prompts)
                yield res
    except BaseException:
        if report:  # what was done is reported; the error that stopped the run is the one raised
            try:
                write_report(out_dir, report, prompts)
            except OSError:
                pass
        raise
    if report:
        write_report(out_dir, report, prompts)
