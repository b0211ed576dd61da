"""Put known bugs into the code one at a time and check that a test fails on each (issue 30).

Each bug is a textual search/replace in one source file (the search text must occur exactly
once). For each: the file is changed, the tests named for it run in a pytest subprocess, and
the file is put back byte for byte (mtime too) whatever happens. A bug is caught when those
tests fail (pytest exit status 1). First the same tests run on the unchanged code and must
pass, else a failure would say nothing. Prints a table; exits 1 when a bug is not caught.

Run from the repository root (or anywhere: paths are the repository's):
    python scripts/check_tests_catch_bugs.py            # every bug
    python scripts/check_tests_catch_bugs.py 1 3        # bugs 1 and 3 only
    python scripts/check_tests_catch_bugs.py --no-baseline

Before splitting or moving code, add a row here for a bug the change could introduce.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Bug:
    name: str
    file: str       # relative to the repository root
    search: str
    replace: str
    tests: tuple    # pytest node ids


BUGS = [
    Bug("best/ chosen with val < best (the worst epoch kept)", "napari_vlsm/core/training/train.py",
        "improved = val > self.best if informative else", "improved = val < self.best if informative else",
        ("tests/test_train.py::test_best_keeps_the_epoch_with_the_highest_validation_dice",)),
    Bug("best/ also replaced on the final save", "napari_vlsm/core/training/checkpoint_policy.py",
        "if improved or best_is_last else None", "if improved or best_is_last or final else None",
        ("tests/test_train.py::test_best_keeps_the_epoch_with_the_highest_validation_dice",)),
    Bug("checkpoint swap non-atomic (remove the target, then rename)", "napari_vlsm/core/atomic.py",
        "            os.replace(target, old)\n", "            shutil.rmtree(target)\n",
        ("tests/test_faults.py::test_a_rename_that_fails_during_the_checkpoint_swap_loses_no_checkpoint",)),
    Bug("images without the object no longer asked for their own class", "napari_vlsm/core/training/train.py",
        "        _ask_own_class_where_absent(target, prompts, examples, plan.negatives, rng)\n",
        "        pass\n",
        ("tests/test_recipe.py::test_a_finetune_asks_images_without_the_object_for_their_own_class",)),
    Bug("--replay-fraction ignored (always the default share)", "napari_vlsm/core/training/settings.py",
        "        if self.replay_fraction is not None:\n", "        if False:\n",
        ("tests/test_recipe.py::test_the_replay_share_given_on_the_command_line_is_the_share_of_each_batch",)),
    Bug("a mix of known and new classes gets an adapter (all, not any)", "napari_vlsm/core/training/adapters.py",
        "if not prompts or any(p in known for p in prompts):", "if not prompts or all(p in known for p in prompts):",
        ("tests/test_adapters.py::test_a_mix_of_known_and_new_classes_trains_the_shared_network",)),
    Bug("correction adapters offered to every family (a carded BiomedCLIPSeg ends in a traceback)",
        "napari_vlsm/core/training/adapters.py", "or not (family and family.adapters) or", "or",
        ("tests/test_families.py::test_finetuning_a_folder_that_carries_a_card",)),
    Bug("text-embedding cache answered by the prompt's first word", "napari_vlsm/core/inference/predictor.py",
        "return torch.stack([torch.as_tensor(self._text_cache[p]) for p in prompts])",
        "return torch.stack([torch.as_tensor(next(v for k, v in self._text_cache.items() "
        "if k.split()[0] == p.split()[0])) for p in prompts])",
        ("tests/test_predictor.py::test_prompts_that_share_a_first_word_get_their_own_answers",)),
    Bug("a checkpoint written after every step (closing midway keeps half an epoch)", "napari_vlsm/core/training/train.py",
        '            yield step_progress(plan, run, epoch,',
        '            checkpoints.save(True, True, final=True); yield step_progress(plan, run, epoch,',
        ("tests/test_train.py::test_closing_the_generator_midway_leaves_checkpoints_loadable",)),
    Bug("replace mode writes like fill (the annotator's labels stay)", "napari_vlsm/plugin/label_writing.py",
        '    write_mode = "fill" if mode == "fill" else "replace"', '    write_mode = "fill"',
        ("tests/test_widget.py::test_replace_mode_is_undoable",)),
    Bug("the slider re-thresholds a single prompt with > (the predictor uses >=)", "napari_vlsm/plugin/label_writing.py",
        "    return combine_labels(probs, threshold)\n",
        "    return (probs[0] > threshold).astype(np.uint8) if len(probs) == 1 else combine_labels(probs, threshold)\n",
        ("tests/test_widget.py::test_the_slider_labels_a_probability_exactly_at_the_threshold_as_the_predictor_does",)),
    Bug("the series auto-saves a proposal nobody touched", "napari_vlsm/plugin/series_widget.py",
        "        if not outcome.kept:", "        if False:",
        ("tests/test_series_sessions.py::test_auto_save_writes_only_edits_and_asks_before_replacing_an_earlier_sessions_mask",)),
    Bug("Previous goes back by name, not the way the annotator walked", "napari_vlsm/plugin/series_widget.py",
        "        if before in names:\n", "        if False:\n",
        ("tests/test_series_sessions.py::test_previous_goes_back_the_way_the_annotator_walked",)),
    Bug("the slider re-thresholds a single prompt with > where the predictor's masks use >=",
        "napari_vlsm/core/images/postprocess.py",
        "        binarize(probs[0], value, out=labels)\n",
        "        np.greater(probs[0], value, out=labels, casting=\"unsafe\")\n",
        ("tests/test_predictor.py::test_a_probability_exactly_at_the_threshold_is_the_prompts_for_the_predictor_and_"
         "the_slider",)),
    Bug("text-embedding cache keyed on the prompt with its inner spaces removed", "napari_vlsm/core/inference/predictor.py",
        "        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]\n"
        "        if len(self._text_cache) + len(missing) > TEXT_CACHE_SIZE:\n"
        "            self._text_cache.clear()\n"
        "            missing = list(dict.fromkeys(prompts))\n"
        "        if missing:\n"
        "            for p, emb in zip(missing, self.backend.encode_text(missing)):\n"
        "                self._text_cache[p] = emb\n"
        "        return torch.stack([torch.as_tensor(self._text_cache[p]) for p in prompts])\n",
        "        missing = [p for p in dict.fromkeys(prompts) if p.replace(' ', '') not in self._text_cache]\n"
        "        if len(self._text_cache) + len(missing) > TEXT_CACHE_SIZE:\n"
        "            self._text_cache.clear()\n"
        "            missing = list(dict.fromkeys(prompts))\n"
        "        if missing:\n"
        "            for p, emb in zip(missing, self.backend.encode_text(missing)):\n"
        "                self._text_cache[p.replace(' ', '')] = emb\n"
        "        return torch.stack([torch.as_tensor(self._text_cache[p.replace(' ', '')]) for p in prompts])\n",
        ("tests/test_predictor.py::test_prompts_that_differ_only_in_spaces_get_their_own_embeddings_through_the_cache",)),
    Bug("a Dask task whose worker dies on every try reported ok", "napari_vlsm/core/inference/cluster.py",
        'yield FileOutcome(p, "failed", message="the worker segmenting it died on every try',
        'yield FileOutcome(p, "ok", message="the worker segmenting it died on every try',
        ("tests/test_cluster.py::test_images_whose_worker_dies_on_every_try_are_reported_failed_not_ok",)),
]


def run_tests(tests) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1",  # no cached bytecode of a changed file outlives the change
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"),
           "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def check(bug: Bug) -> tuple[str, bool, int]:
    """(file:line, caught, pytest's exit status) for one bug, the file restored afterwards."""
    path = ROOT / bug.file
    original = path.read_bytes()
    stat = path.stat()
    text = original.decode()
    count = text.count(bug.search)
    assert count == 1, f"{bug.file}: the search text of '{bug.name}' occurs {count} times, not once"
    where = f"{bug.file}:{text[:text.index(bug.search)].count(chr(10)) + 1}"
    try:
        path.write_text(text.replace(bug.search, bug.replace))
        rc = run_tests(bug.tests)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return where, rc == 1, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", type=int, help="numbers of the bugs to check (default: all)")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unchanged code")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still puts the file back (finally)
    chosen = [(i, b) for i, b in enumerate(BUGS, 1) if not args.only or i in args.only]
    t0 = time.time()
    if not args.no_baseline:
        tests = list(dict.fromkeys(t for _, b in chosen for t in b.tests))
        rc = run_tests(tests)
        if rc != 0:
            print(f"The tests fail on the unchanged code (pytest exit status {rc}); fix that first:\n  "
                  + "\n  ".join(tests))
            return 2
    rows = []
    for i, bug in chosen:
        where, caught, rc = check(bug)
        rows.append((str(i), bug.name, where, " ".join(t.split("::")[-1] for t in bug.tests),
                     "yes" if caught else f"NO (pytest exit {rc})"))
        print(f"{i}. {bug.name}: {'caught' if caught else 'NOT caught'}", flush=True)
    head = ("#", "bug", "where", "test", "caught")
    widths = [max(len(r[k]) for r in rows + [head]) for k in range(len(head))]
    print()
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    missed = [r for r in rows if r[-1] != "yes"]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} bugs caught in {time.time() - t0:.0f} s.")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
