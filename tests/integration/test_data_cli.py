"""The data commands from the command line, as a member would run them, on the real data the
examples name: ingest every modality, release, build an industry-common dataset, list, show,
diff; and one clear line (exit 2) for each kind of bad file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
INDAI = str(Path(sys.executable).parent / "indai")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cli-home")


def indai(home: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INDAI_")}
    done = subprocess.run([INDAI, *args], capture_output=True, text=True, timeout=600, env={**env, "INDAI_HOME": str(home)})
    if ok:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_every_example_ingests_releases_and_shares(home):
    out = {}
    for example in ("cwru-0hp", "nestor-excavators", "elpv", "maintie", "drawings", "manuals"):
        line = indai(home, "data", "ingest", "--quiet", f"examples/{example}/dataset.yaml").stdout.splitlines()[0]
        assert line.startswith("dataset ") and "(raw, member " in line
        out[example] = line.split()[1]
    assert "records train 1581" in indai(home, "data", "ingest", "--quiet", "examples/nestor-excavators/dataset.yaml").stdout
    listed = indai(home, "data", "ls").stdout
    assert all(ref in listed for ref in out.values()) and listed.count(" raw ") == 6
    released = indai(home, "data", "release", out["nestor-excavators"], "--config", "bench/data/deid_eval_config.yaml").stdout
    assert released.startswith(f"released {out['nestor-excavators']} as nestor-excavators-released@") and "de-identified:" in released
    indai(home, "member", "add", "nist-demo", "--company", "NIST demo", "--industry", "other", "--role", "research")
    shared = indai(home, "data", "share", "--industry", "other").stdout
    assert shared.startswith("industry-common dataset other-common@") and "nestor-excavators-released@" in shared
    show = json.loads(indai(home, "data", "show", "other-common@latest").stdout)
    assert show["stage"] == "common" and show["inputs"][0]["member"] == "nist-demo" and show["files"].endswith("(show with --files)")
    diff = json.loads(indai(home, "data", "diff", out["nestor-excavators"], "nestor-excavators-released@latest").stdout)
    assert diff["stage"] == ["raw", "released"] and diff["records"]["train"] == [1581, 1581]
    refused = indai(home, "data", "share", "--industry", "other", "--from", out["elpv"], ok=False)
    assert refused.returncode == 2 and "only released versions can be shared" in refused.stderr


def _bad_image(d: Path) -> str:
    d.joinpath("img", "x").mkdir(parents=True)
    from importlib import metadata

    png = Path(metadata.distribution("elpv-dataset").locate_file("elpv_dataset/data/images/cell0001.png")).read_bytes()
    d.joinpath("img", "x", "cell.png").write_bytes(png[: len(png) // 3])
    return "sources: [{kind: files, glob: 'img/*/*.png', modality: image, label_from: folder}]\nsplit: {by: random}"


def _bad_dxf(d: Path) -> str:
    d.joinpath("a.dxf").write_text("0\nSECTION\n2\nHEADER\n9\n$ACADVER\n")
    return "sources: [{kind: files, glob: '*.dxf', modality: cad, label: x}]\nsplit: {by: random}"


def _bad_encoding(d: Path) -> str:
    d.joinpath("t.csv").write_bytes(b"id,note,mode\n1,\xff\xfe\xfd\xfc,a\n")
    return "sources: [{kind: table, path: t.csv, event: id, text: [note], label: mode}]\nsplit: {by: random}"


def _missing_column(d: Path) -> str:
    d.joinpath("t.csv").write_text("id,note\n1,x\n")
    return "sources: [{kind: table, path: t.csv, event: id, text: [note], label: mode}]\nsplit: {by: random}"


def _wrong_rate(d: Path) -> str:
    from scipy.io import wavfile

    wavfile.write(d / "r.wav", 8000, np.zeros(16000, dtype=np.int16))
    return ("sensor: {channels: [v], sampling_rate_hz: 8000, window: 256}\n"
            "sources: [{path: r.wav, label: x, sampling_rate_hz: 12000, columns: {v: 0}}]")


@pytest.mark.parametrize("make,needle", [(_bad_image, "cell.png"), (_bad_dxf, "a.dxf"), (_bad_encoding, "wrong encoding"),
                                         (_missing_column, "missing column(s) ['mode']"), (_wrong_rate, "mismatched sampling rate")])
def test_bad_files_get_one_line_and_exit_2(tmp_path, home, make, needle):
    body = make(tmp_path)
    (tmp_path / "spec.yaml").write_text(f"# indai data ingest spec.yaml\nname: bad\nmember: m1\n{body}\n")
    done = indai(home, "data", "ingest", "--quiet", str(tmp_path / "spec.yaml"), ok=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("indai: error: ") and needle in done.stderr, done.stderr


def test_a_member_cannot_take_over_another_members_dataset_name(tmp_path):
    """The repro of the take-over: a second spec with the same name: and member: evil. The name
    stays the first member's, and a gateway job (INDAI_JOB_MEMBER set) cannot even claim to be
    that member."""
    home = tmp_path / "home"
    rows = "\n".join(f"e{i},seal leak {i},{'ok' if i % 2 else 'ng'}" for i in range(40))
    (tmp_path / "t.csv").write_text("id,note,mode\n" + rows)
    body = "sources: [{kind: table, path: t.csv, event: id, text: [note], label: mode}]\nsplit: {by: random}\n"
    for member in ("victim", "evil"):
        (tmp_path / f"{member}.yaml").write_text(f"# indai data ingest {member}.yaml\nname: shared-name\nmember: {member}\n{body}")
    mine = indai(home, "data", "ingest", "--quiet", str(tmp_path / "victim.yaml")).stdout.split()[1]
    refused = indai(home, "data", "ingest", "--quiet", str(tmp_path / "evil.yaml"), ok=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("indai: error: dataset shared-name belongs to member victim: choose another name")
    assert json.loads(indai(home, "data", "show", "shared-name@latest").stdout)["version"] == mine.split("@")[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INDAI_")}
    job = subprocess.run([INDAI, "data", "ingest", "--quiet", str(tmp_path / "victim.yaml")], capture_output=True, text=True, timeout=600,
                         env={**env, "INDAI_HOME": str(home), "INDAI_JOB_MEMBER": "evil", "INDAI_JOB_ROLE": "researcher"})
    assert job.returncode == 2 and "this job runs for member 'evil' and may write only that member's data" in job.stderr
