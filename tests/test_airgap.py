"""tools/airgap.py: what an air-gapped GPU box is given (the study's environment on the lent H200)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_script


@pytest.fixture(scope="module")
def airgap():
    return load_script("tools/airgap.py")


def test_the_pipeline_set_is_the_installed_closure_with_requested_extras_less_what_the_box_has(airgap):
    names = {airgap._norm(n) for n in airgap.closure(airgap.ROOTS["pipeline"])}
    assert {"mlflow", "prefect", "dvc", "lm-eval", "llmcompressor", "pydantic"} <= names
    # prefect asks for sqlalchemy[asyncio]: without greenlet its server does not start (seen on the H200)
    assert "greenlet" in names
    assert "ruamel-yaml-clib" in names  # dvc.lock parsed in C on the box too
    assert not names & {"torch", "transformers", "numpy", "pandas", "tokenizers", "safetensors"}
    assert not any(n.startswith("nvidia-") for n in names)


def test_dvc_reads_its_lock_file_with_the_c_parser():
    """Every stage item is a `dvc repro --single-item`, which parses dvc.lock (443 KB after a third of the SmolLM2
    grid): ruamel's pure-Python loader took 1.23 s for it, the C one 0.26 s."""
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None and YAML(typ="safe").Parser is CParser


def test_split_parts_join_back_and_a_changed_part_is_refused(airgap, tmp_path):
    big = tmp_path / "model.bin"
    big.write_bytes(bytes(range(256)) * 9000)  # 2.2 MB
    parts = tmp_path / "parts"
    airgap.split([big], parts, part_mib=1)
    entry = json.loads((parts / "parts.json").read_text())["model.bin"]
    assert len(entry["parts"]) == 3
    out = tmp_path / "out"
    out.mkdir()
    assert airgap.join(parts, out) == [out / "model.bin"]
    assert (out / "model.bin").read_bytes() == big.read_bytes()
    (parts / entry["parts"][1]).write_bytes(b"x" * 10)
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        airgap.join(parts, out)


def test_call_mib_sizes_the_transfers_beside_the_tracked_tree_that_travels_with_every_call(airgap, tmp_path):
    """Lease 10: parts of 45 MiB were refused beside an 18.7 MiB tree (the committed run folders had grown it).
    ``--call-mib`` counts the tree that travels, as the device tool copies it: tracked files and untracked ones git
    does not ignore (a run folder unpacked mid-lease, not yet committed), not ignored ones (the bundle), and leaves
    a margin."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "tracked.bin").write_bytes(b"x" * (3 << 20) + b"y")  # 3 MiB and a byte: counts as 4
    subprocess.run(["git", "add", "tracked.bin"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("ignored.bin\n")
    (repo / "ignored.bin").write_bytes(b"x" * (20 << 20))
    assert airgap.tree_bytes(repo) == (3 << 20) + 1 + len("ignored.bin\n")
    (repo / ".gitignore").unlink()
    (repo / "ignored.bin").rename(repo / "untracked.bin")  # now untracked and not ignored: it travels
    assert airgap.tree_bytes(repo) == (3 << 20) + 1 + (20 << 20)
    (repo / "untracked.bin").unlink()
    assert airgap.tree_bytes(repo) == (3 << 20) + 1
    assert airgap.transfer_limit(64, airgap.tree_bytes(repo)) == 64 - 6 - 4
    assert airgap.transfer_limit(64, int(18.7 * (1 << 20))) == 39  # lease 10's tree: 45 was refused, 40 went
    with pytest.raises(SystemExit, match="leaves 5 MiB per transfer in a 64 MiB call"):
        airgap.transfer_limit(64, 53 << 20)
    with pytest.raises(SystemExit, match="needs a git checkout"):
        airgap.tree_bytes(tmp_path / "nowhere")
    # through the command line, before anything is downloaded or packed: a tree too big for the call is refused
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "airgap.py"), "pack", "--out", str(tmp_path / "b"), "--call-mib", "12"],
        capture_output=True, text=True, cwd=repo,
    )  # fmt: skip
    assert out.returncode != 0 and "leaves 2 MiB per transfer in a 12 MiB call" in out.stderr
    assert not (tmp_path / "b").exists()


def test_pack_fills_transfers_under_the_limit_keeping_each_files_folder(airgap, tmp_path):
    src = tmp_path / "src"
    src.mkdir()

    def blob(name: str, kib: int):
        path = src / name
        path.write_bytes(b"x" * (kib << 10))
        return path

    wheels = [blob(f"w{i}.whl", 300) for i in range(5)]  # 1.5 MiB of wheels
    parts = [blob("model.part000", 700), blob("model.part001", 600)]
    rest = [blob("shared.tar.xz", 200)]
    folders = airgap.pack({"wheels": wheels, "parts": parts, "": rest}, tmp_path / "bundle", transfer_mib=1)
    sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in folders]
    assert all(size <= 1 << 20 for size in sizes) and len(folders) == 4  # 3400 KiB: at least 4 transfers of 1 MiB
    merged = {f.relative_to(d).as_posix() for d in folders for f in d.rglob("*") if f.is_file()}
    assert merged == {f"wheels/w{i}.whl" for i in range(5)} | {"parts/model.part000", "parts/model.part001"} | {
        "shared.tar.xz",
        "transfers.json",
    }
    manifest = json.loads((tmp_path / "bundle" / "transfers.json").read_text())
    assert sorted(manifest) == ["c1", "c2", "c3", "c4"]
    assert all(
        (d / "transfers.json").read_text() == (tmp_path / "bundle" / "transfers.json").read_text() for d in folders
    )
    with pytest.raises(SystemExit, match="over the 1 MiB transfer: split it"):
        airgap.pack({"": [blob("big.bin", 1100)]}, tmp_path / "bundle2", transfer_mib=1)


def test_check_on_the_box_names_the_transfers_that_did_not_arrive_before_anything_is_installed(airgap, tmp_path):
    """Lease 8: the box was given back after c1, c2-c4 landed on a new one, and setup failed only at the import
    check (c1's wheel of pydantic-settings). The bootstrap now stops first, naming c1."""
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for i, kib in enumerate((700, 600, 500)):
        files.append(src / f"w{i}.whl")
        files[-1].write_bytes(b"x" * (kib << 10))
    folders = airgap.pack({"wheels": files}, tmp_path / "bundle", transfer_mib=1)
    assert len(folders) == 3
    stash = tmp_path / "stash"
    for d in folders[1:]:  # c1 lost with the first box
        shutil.copytree(d, stash, dirs_exist_ok=True)
    assert airgap.missing(stash) == {"c1": ["wheels/w0.whl"]}
    boot = subprocess.run(
        ["sh", str(REPO / "tools" / "airgap_bootstrap.sh"), str(stash), str(tmp_path / "site")],
        capture_output=True,
        text=True,
    )
    assert boot.returncode != 0 and "lacks c1 (1 file(s), e.g. wheels/w0.whl): carry c1 again" in boot.stderr
    assert not (tmp_path / "site").exists()  # nothing installed
    (stash / "wheels" / "w0.whl").write_bytes(b"x" * 10)  # a truncated copy is not an arrival either
    assert airgap.missing(stash) == {"c1": ["wheels/w0.whl"]}
    shutil.copytree(folders[0], stash, dirs_exist_ok=True)
    assert airgap.missing(stash) == {}
    with pytest.raises(SystemExit, match="no transfers.json"):
        airgap.missing(tmp_path)


def test_study_box_stop_ends_the_run_session_and_the_samplers_and_nothing_else(tmp_path):
    """On the H200 the run was ended with ``pkill -f nvidia-smi``, which matched the device call's own shell and
    killed it before ``collect``. ``stop`` ends exactly what ``start`` began, by the pids it saved: the run's whole
    session (the flow and the stage it is in, KILLed if it outlives TERM) and the two samplers; a second ``start``
    while a run is going is refused (it would orphan the first)."""
    import subprocess
    import time

    bin_ = tmp_path / "site" / "bin"
    bin_.mkdir(parents=True)
    # a stage that ignores TERM (ignored signals survive exec: the sleep ignores it too)
    (bin_ / "selfcal").write_text("#!/bin/sh\necho \"selfcal $*\"\ntrap '' TERM\nsleep 300 &\nwait\n")
    (bin_ / "nvidia-smi").write_text('#!/bin/sh\nwhile true; do echo "t, 0, 5 %, 1 MiB"; sleep 1; done\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = _box_env(tmp_path, bin_, work, PROFILE="study-smollm2-sweep-n")
    box = [str(REPO / "tools" / "study_box.sh")]
    # stands for the device call's own shell: its command line names what a pattern kill would look for
    bystander = subprocess.Popen(["bash", "-c", "sleep 300 # nvidia-smi selfcal study_box.sh run", "x"])
    run_pid, samplers = 0, []
    try:
        out = subprocess.run([*box, "start", "--only", "evaluate@x"], env=env, cwd=work, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        run_pid = int((tmp_path / "study.pid").read_text())
        samplers = [int(p) for p in (tmp_path / "sampler.pid").read_text().split()]
        assert len(samplers) == 2  # nvidia-smi and the CPU sampler
        for _ in range(50):
            if "selfcal run --profile study-smollm2-sweep-n --only evaluate@x" in (tmp_path / "study.log").read_text():
                break
            time.sleep(0.1)
        else:
            raise AssertionError((tmp_path / "study.log").read_text())
        again = subprocess.run([*box, "start", "--only", "y"], env=env, cwd=work, capture_output=True, text=True)
        assert again.returncode == 2 and "a run is going" in again.stderr
        assert int((tmp_path / "study.pid").read_text()) == run_pid
        assert len(_pids_in_group(run_pid)) >= 2  # the run script and the stage it waits on
        out = subprocess.run([*box, "stop"], env=env, cwd=work, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "study_box: stopped" in out.stdout, out.stderr
        assert "still alive after TERM: KILL" in out.stderr  # the stage ignored TERM
        time.sleep(0.5)
        assert _pids_in_group(run_pid) == [] and all(_pids_in_group(p) == [] for p in samplers)
        assert not (tmp_path / "study.pid").exists() and not (tmp_path / "sampler.pid").exists()
        assert bystander.poll() is None  # only what start began
        cpu = (tmp_path / "cpu.log").read_text().splitlines()
        assert cpu and cpu[0].split()[1] == "cpu" and len(cpu[0].split()) >= 12  # time, /proc/stat's line, loadavg
        out = subprocess.run([*box, "progress", "5"], env=env, cwd=work, capture_output=True, text=True)
        assert out.returncode == 0 and "no run" in out.stdout
    finally:
        bystander.kill()
        for pid in [run_pid, *samplers]:
            if pid:
                subprocess.run(["kill", "-KILL", "--", f"-{pid}"], capture_output=True)


def test_study_box_round_collects_while_the_run_goes_on_and_the_next_round_lets_it_go_on(tmp_path):
    """Lease 6 lost two boxes between device calls (more than 30 s idle): what a call had collected came back,
    the rest was lost. ``round`` is one call's worth: start (unless a run is going), progress, collect while
    the run goes on, so each call returns the records so far without cutting a long item (Ji's pools) at the
    call's end; the MLflow store comes back as a consistent snapshot of the live database."""
    import io
    import os
    import sqlite3
    import subprocess
    import tarfile

    bin_ = _round_fakes(tmp_path)
    work, out = tmp_path / "work", tmp_path / "out"
    (work / ".selfcal").mkdir(parents=True)
    out.mkdir()
    (work / "dvc.lock").write_text(LOCK)
    (work / "params.yaml").write_text("seed: 0\n")
    store = sqlite3.connect(work / ".selfcal" / "mlflow.db")
    store.execute("PRAGMA journal_mode=WAL")
    store.execute("PRAGMA wal_autocheckpoint=0")
    store.execute("CREATE TABLE registered (name TEXT)")
    store.execute("INSERT INTO registered VALUES ('m:1')")
    store.commit()
    env = _box_env(tmp_path, bin_, work, STEP="1", TMPDIR=str(tmp_path))
    box = [str(REPO / "tools" / "study_box.sh")]
    round_ = [*box, "round", "1", str(out), "run-x", "--only", "evaluate@x"]

    def came_back(name):
        with tarfile.open(out / "run-x.tgz") as tar:
            return tar.extractfile(name).read()

    try:
        first = subprocess.run(round_, env=env, cwd=work, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        run_pid = int((tmp_path / "study.pid").read_text())
        assert "study_box: still running" in first.stdout and os.path.exists(f"/proc/{run_pid}")  # not stopped
        assert _stages(came_back("dvc.lock")) == ["guard", "item-1"]
        assert came_back("params.yaml") == b"seed: 0\n"
        with tarfile.open(fileobj=io.BytesIO(came_back("mlflow-store.tar.xz"))) as tar:
            tar.extractall(tmp_path / "store", filter="data")
        snap = sqlite3.connect(tmp_path / "store" / ".selfcal" / "mlflow.db")
        assert snap.execute("SELECT name FROM registered").fetchall() == [("m:1",)]  # the WAL's rows too
        snap.close()
        second = subprocess.run(round_, env=env, cwd=work, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert "a run is going" in second.stdout and int((tmp_path / "study.pid").read_text()) == run_pid
        stop = subprocess.run([*box, "stop"], env=env, cwd=work, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and not (tmp_path / "sampler.pid").exists()
        assert (out / "study.log").read_text().count("selfcal run --profile study-smollm2 --only evaluate@x") == 1
        assert not list(tmp_path.glob("collect.*")) and not (work / "mlflow-store.tar.xz").exists()
    finally:
        store.close()
        for pidfile in ("study.pid", "sampler.pid"):
            if (tmp_path / pidfile).exists():
                for pid in (tmp_path / pidfile).read_text().split():
                    subprocess.run(["kill", "-KILL", "--", f"-{pid}"], capture_output=True)


def test_study_box_round_under_timeout_collects_what_is_done_and_leaves_the_run_going(tmp_path):
    """Lease 10's second box: the call's limit ended ``round`` (setup had taken its first 45 s) before its
    collect, and nothing came back. Under ``timeout`` a round's TERM now collects what is done, then exits
    143 (timeout's own status: 124), and the run goes on for the next call; without the trap the tarball
    would not exist until the 30 s round had passed."""
    import os
    import subprocess
    import tarfile
    import time

    bin_ = _round_fakes(tmp_path)
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "dvc.lock").write_text(LOCK)
    (work / "params.yaml").write_text("seed: 0\n")
    env = _box_env(tmp_path, bin_, work, STEP="1", TMPDIR=str(tmp_path))
    box = [str(REPO / "tools" / "study_box.sh")]
    try:
        t0 = time.monotonic()
        cut = subprocess.run(["timeout", "3", *box, "round", "30", str(out), "run-x", "--only", "evaluate@x"],
                             env=env, cwd=work, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert cut.returncode == 124 and time.monotonic() - t0 < 20, (cut.stdout, cut.stderr)
        assert "study_box: TERM: collecting what is done" in cut.stderr
        with tarfile.open(out / "run-x.tgz") as tar:
            assert _stages(tar.extractfile("dvc.lock").read()) == ["guard", "item-1"]
        run_pid = int((tmp_path / "study.pid").read_text())
        assert os.path.exists(f"/proc/{run_pid}")  # the run was not stopped
        assert not list(tmp_path.glob("collect.*")) and not list(out.glob(".*.part"))  # written whole, renamed
    finally:
        subprocess.run([*box, "stop"], env=env, cwd=work, capture_output=True, text=True, timeout=60)


#: A dvc.lock as DVC writes it (a mapping with ``schema`` and ``stages``, a final newline): what collect passes on
LOCK = "schema: '2.0'\nstages:\n  guard: {cmd: g}\n"


def _stages(data: bytes) -> list[str]:
    import yaml

    return list(yaml.safe_load(data)["stages"])


def _round_fakes(tmp_path):
    """A box's commands for ``round``: ``selfcal run`` finishes one item, then works on the next for a while;
    ``selfcal study-report`` (collect's check) says what it was asked; nvidia-smi samples; the test's python."""
    import sys

    bin_ = tmp_path / "site" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "selfcal").write_text(
        '#!/bin/sh\necho "selfcal $*"\n[ "$1" = run ] || exit 0\n'
        'echo "  item-$(($(grep -c "cmd: x" dvc.lock) + 1)): {cmd: x}" >> dvc.lock\nsleep 4\n'
        'echo "  item-$(($(grep -c "cmd: x" dvc.lock) + 1)): {cmd: x}" >> dvc.lock\n'
    )
    (bin_ / "nvidia-smi").write_text('#!/bin/sh\nwhile true; do echo "t, 0, 5 %, 1 MiB"; sleep 1; done\n')
    (bin_ / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    return bin_


def test_study_box_round_without_a_chunk_never_starts_a_run_and_a_new_box_is_refused(tmp_path):
    """Lease 7: the box was given back between two calls; the next call's round (no chunk: the run was meant
    to go on) found no run on the new box, started the whole profile, then died on the missing clone. A round
    without a chunk now starts nothing: it collects what an ended run left, or says the box is new."""
    import subprocess
    import tarfile

    bin_ = _round_fakes(tmp_path)
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    env = _box_env(tmp_path, bin_, work, STEP="1", TMPDIR=str(tmp_path))
    box = [str(REPO / "tools" / "study_box.sh")]
    for args in ([], ["--only", "evaluate@x"]):  # a new box: no clone (setup never ran), with a chunk or not
        new_box = subprocess.run([*box, "round", "1", str(out), "run-x", *args], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert new_box.returncode == 2 and f"no {work}: this box is not set up" in new_box.stderr
        assert not (tmp_path / "study.pid").exists() and not (tmp_path / "study.log").exists()
        assert not (out / "run-x.tgz").exists()
    work.mkdir()
    (work / "dvc.lock").write_text(LOCK + "  item-1: {cmd: x}\n")  # an ended run's
    (work / "params.yaml").write_text("seed: 0\n")
    ended = subprocess.run([*box, "round", "1", str(out), "run-x"], env=env, cwd=work,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ended.returncode == 0, ended.stderr
    assert "no run going and no chunk given: nothing started" in ended.stdout
    assert not (tmp_path / "study.pid").exists() and "selfcal run" not in ended.stdout
    with tarfile.open(out / "run-x.tgz") as tar:
        assert _stages(tar.extractfile("dvc.lock").read()) == ["guard", "item-1"]


def test_study_box_lane_runs_a_second_profile_beside_the_first_in_its_own_clone_and_comes_back_apart(tmp_path):
    """Lease 9 ran the set-size sweep beside Ji's chunk (its pools hold three slots for six minutes) by setting
    WORK, LOG, the pid files and the samples by hand. ``LANE=n`` does it: its own clone of the commit setup
    restored, its own log and pids (stop ends only its run), and collect writes into OUT/n, so one call brings
    both runs back without one's files overwriting the other's; on a box never set up a lane is refused."""
    import subprocess
    import tarfile

    bin_ = _round_fakes(tmp_path)
    root, work, out = tmp_path / "box", tmp_path / "study-work", tmp_path / "out"  # setup's clone: study-work
    root.mkdir()
    (root / "dvc.lock").write_text(LOCK)
    (root / "params.yaml").write_text("seed: 1\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "."], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "box"], cwd=root, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(root), str(work)], check=True)
    (work / "params.yaml").write_text("seed: 0\n")  # the main run's own (uncommitted): the lane gets the commit's
    main_env = _box_env(tmp_path, bin_, work, STEP="1", TMPDIR=str(tmp_path), STATE_ROOT=str(tmp_path))
    lane_env = {
        k: v for k, v in main_env.items() if k not in ("WORK", "LOG", "PIDFILE", "SAMPLER", "GPU_CSV", "CPU_LOG")
    }
    lane_env |= {"LANE": "n", "PROFILE": "study-smollm2-sweep-n"}
    box = [str(REPO / "tools" / "study_box.sh")]
    lane_state = tmp_path / "study-n"
    try:
        first = subprocess.run([*box, "round", "1", str(out), "run-x", "--only", "evaluate@x"], env=main_env,
                               cwd=root, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert first.returncode == 0, first.stderr
        lane = subprocess.run([*box, "round", "1", str(out), "run-n", "--only", "evaluate@y"], env=lane_env,
                              cwd=root, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert lane.returncode == 0, lane.stderr
        clone = tmp_path / "study-work-n"
        assert f"lane n: commit {head[:7]}" in lane.stdout and (clone / "params.yaml").read_text() == "seed: 1\n"
        main_pid, lane_pid = int((tmp_path / "study.pid").read_text()), int((lane_state / "study.pid").read_text())
        assert main_pid != lane_pid
        with tarfile.open(out / "n" / "run-n.tgz") as tar:
            assert tar.extractfile("params.yaml").read() == b"seed: 1\n"  # the lane's clone, not WORK
        with tarfile.open(out / "run-x.tgz") as tar:
            assert tar.extractfile("params.yaml").read() == b"seed: 0\n"
        assert "--profile study-smollm2-sweep-n --only evaluate@y" in (out / "n" / "study.log").read_text()
        assert "evaluate@y" not in (out / "study.log").read_text()
        assert sorted(f.name for f in (out / "n").iterdir()) == ["cpu.log", "gpu.csv", "run-n.tgz", "study.log"]
        stop = subprocess.run([*box, "stop"], env=lane_env, cwd=root, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and not (lane_state / "study.pid").exists()
        assert _pids_in_group(lane_pid) == []
        main_samplers = [int(p) for p in (tmp_path / "sampler.pid").read_text().split()]
        assert all(_pids_in_group(p) for p in main_samplers)  # the first run's samplers go on: only the lane's stop
    finally:
        for pidfile in (tmp_path / "study.pid", tmp_path / "sampler.pid", lane_state / "study.pid",
                        lane_state / "gpu-sampler.pid"):  # fmt: skip
            if pidfile.exists():
                for pid in pidfile.read_text().split():
                    subprocess.run(["kill", "-KILL", "--", f"-{pid}"], capture_output=True)
    # an OUT relative to the caller's folder, though progress and collect work in the clone
    again = subprocess.run([*box, "round", "1", "rel-out", "run-n"], env=lane_env, cwd=root, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (root / "rel-out" / "n" / "run-n.tgz").is_file() and not (tmp_path / "study-work-n" / "rel-out").exists()
    # a box never set up (no study-work beside the tree, though the tree has a .git): refused, nothing cloned
    bare = tmp_path / "new-box" / "tree"
    subprocess.run(["git", "clone", "-q", str(root), str(bare)], check=True)
    refused = subprocess.run([*box, "round", "1", str(out), "run-m", "--only", "z"], env=lane_env | {"LANE": "m"},
                             cwd=bare, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "this box is not set up" in refused.stderr
    assert not (tmp_path / "new-box" / "study-work-m").exists()
    bad = subprocess.run([*box, "stop"], env=lane_env | {"LANE": "../x"}, cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "LANE=../x: letters, digits, - and _ only" in bad.stderr


def _box_env(tmp_path, bin_, work, **extra) -> dict:
    """study_box.sh's environment in a test: the fakes in ``bin_`` first on PATH, every file it writes under
    ``tmp_path``."""
    import os

    return (
        os.environ
        | {
            "PATH": f"{bin_}:{os.environ['PATH']}",
            "SITE": str(tmp_path / "site"),
            "WORK": str(work),
            "LOG": str(tmp_path / "study.log"),
            "PIDFILE": str(tmp_path / "study.pid"),
            "SAMPLER": str(tmp_path / "sampler.pid"),
            "GPU_CSV": str(tmp_path / "gpu.csv"),
            "CPU_LOG": str(tmp_path / "cpu.log"),
            "STATE_ROOT": str(tmp_path),  # dvc.lock's last good copy, beside the pid files
        }
        | extra
    )


def _pids_in_group(pgid: int) -> list[int]:
    import os

    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry))
    return out


def test_study_box_collect_brings_back_the_records_and_the_mlflow_store_packed_and_the_store_still_traces(
    tmp_path, monkeypatch
):
    """What comes back from a lease is committed and travels with every later call (64 MiB a call): the store
    (4.8 MB in lease 4) comes back packed, the records plain, no weights; the packed store opens as the plain
    one did, with its artifact copies beside it."""
    import sqlite3
    import subprocess
    import tarfile
    from contextlib import closing

    from selfcal.lineage.run_store import store_db

    monkeypatch.setenv("SELFCAL_STORE_CACHE", str(tmp_path / "cache"))
    bin_ = tmp_path / "site" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "selfcal").write_text("#!/bin/sh\nexit 0\n")  # the on-box report check
    (bin_ / "selfcal").chmod(0o755)
    work = tmp_path / "work"
    for d in ("artifacts/evaluations", "artifacts/checkpoints/self-s0-gptq", ".selfcal/mlartifacts/r1/artifacts"):
        (work / d).mkdir(parents=True)
    (work / "dvc.lock").write_text(LOCK)
    (work / "artifacts/evaluations/self-s0-gptq.json").write_text("{}\n")
    (work / "artifacts/evaluations/.self-s1-gptq.json.tmp-0a1b2c3d").write_text("{")  # a writer's scratch file
    (work / "artifacts/checkpoints/self-s0-gptq/manifest.json").write_text("{}\n")
    (work / "artifacts/checkpoints/self-s0-gptq/model.safetensors").write_bytes(b"\0" * 1024)
    with closing(sqlite3.connect(work / ".selfcal/mlflow.db")) as con, con:
        con.execute("CREATE TABLE registered (name TEXT)")
        con.execute("INSERT INTO registered VALUES ('SmolLM2-gptq-self:1')")
    (work / ".selfcal/mlartifacts/r1/artifacts/manifest.json").write_text('{"m": 1}\n')
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = _box_env(tmp_path, bin_, work)  # no log or samples written: collect brings none back
    done = subprocess.run(
        [str(REPO / "tools" / "study_box.sh"), "collect", str(out_dir), "lease-x"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    with tarfile.open(out_dir / "lease-x.tgz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "back", filter="data")
    assert "mlflow-store.tar.xz" in names and "artifacts/evaluations/self-s0-gptq.json" in names
    assert not [n for n in names if n.startswith(".selfcal") or n.endswith(".safetensors") or ".tmp-" in n]
    db = store_db(tmp_path / "back")
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT name FROM registered").fetchall() == [("SmolLM2-gptq-self:1",)]
    assert (db.parent / "mlartifacts/r1/artifacts/manifest.json").read_text() == '{"m": 1}\n'


def test_study_box_stop_ends_the_run_while_holding_dvcs_lock(tmp_path):
    """Lease 10's n3 came back with a dvc.lock cut mid-line: ``stop`` had killed a dvc while it was "Updating
    lock file". DVC writes it only under its repo lock, so ``stop`` now holds that lock while it ends the run:
    a stage that is TERMed tries the lock (as a dvc about to record it would) and finds it taken."""
    import subprocess
    import sys
    import time

    bin_ = tmp_path / "site" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "selfcal").write_text(
        f"#!{sys.executable}\n"
        "import fcntl, os, signal, sys, time\n"
        "def on_term(*_):\n"
        "    with open('.dvc/tmp/lock', 'a+') as fh:\n"
        "        try:\n"
        "            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "            seen = 'took it'\n"
        "        except BlockingIOError:\n"
        "            seen = 'locked out'\n"
        "    open(os.environ['TERM_SEEN'], 'w').write(seen)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('selfcal', *sys.argv[1:], flush=True)\n"
        "time.sleep(300)\n"
    )
    (bin_ / "nvidia-smi").write_text('#!/bin/sh\nwhile true; do echo "t, 0, 5 %, 1 MiB"; sleep 1; done\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    work = tmp_path / "work"
    (work / ".dvc" / "tmp").mkdir(parents=True)
    seen = tmp_path / "seen"
    env = _box_env(tmp_path, bin_, work, TERM_SEEN=str(seen))
    box = [str(REPO / "tools" / "study_box.sh")]
    try:
        out = subprocess.run([*box, "start", "--only", "evaluate@x"], env=env, cwd=work, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        for _ in range(100):
            if "selfcal run" in (tmp_path / "study.log").read_text():
                break
            time.sleep(0.1)
        stop = subprocess.run([*box, "stop"], env=env, cwd=work, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and "study_box: stopped" in stop.stdout, stop.stderr
        assert seen.read_text() == "locked out"
        assert not (tmp_path / "study.pid").exists() and not (tmp_path / "sampler.pid").exists()
    finally:
        for pidfile in ("study.pid", "sampler.pid"):
            if (tmp_path / pidfile).exists():
                for pid in (tmp_path / pidfile).read_text().split():
                    subprocess.run(["kill", "-KILL", "--", f"-{pid}"], capture_output=True)
