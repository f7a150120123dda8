"""runtime.provenance: file hashes, the git commit, versions, the command line, JSON."""
import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from usfmae_fast.runtime.provenance import command_line, provenance, provenance_markdown

REPO = Path(__file__).resolve().parents[1]


def test_file_hash_and_size_match_hashlib(tmp_path):
    path = tmp_path / "weights.pt"
    data = bytes(range(256)) * 5000  # > one read chunk
    path.write_bytes(data)
    record = provenance(files={"init": path, "manifest": None})["files"]
    assert record["init"] == {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(),
                              "bytes": len(data)}
    assert record["manifest"] is None


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_a_missing_file_or_a_folder_names_the_key(tmp_path, kind):
    path = tmp_path / "nothing.pt" if kind == "missing" else tmp_path
    with pytest.raises(ValueError, match="'init_checkpoint'"):
        provenance(files={"init_checkpoint": path})


def test_commit_is_the_checkouts_head():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True)
    p = provenance()
    if head.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    assert p["commit"] == head.stdout.strip() and isinstance(p["dirty"], bool)


def test_versions_and_the_rest_are_present_and_json_ready():
    p = provenance(config={"optim": {"lr": 1e-3}}, seed=3, device="cpu")
    for key in ("python", "torch", "torchvision", "timm", "numpy", "scikit-learn",
                "usfmae_fast", "triton", "cuda"):
        assert key in p["versions"]
    assert p["versions"]["torch"] and p["versions"]["usfmae_fast"] == p["package_version"]
    assert p["created"].endswith("+00:00") and p["seed"] == 3 and p["device"] == "cpu"
    assert json.loads(json.dumps(p)) == p


def test_command_is_shell_quoted_with_the_program_shortened():
    line = command_line(["/usr/bin/usfmae-fast", "pretrain", "--set", "data.source=a b",
                         "it's"])
    assert line == "usfmae-fast pretrain --set 'data.source=a b' 'it'\"'\"'s'"
    assert provenance(command=["x/y.py", "--a"])["command"] == "y.py --a"


def test_markdown_keeps_every_value_in_code_spans(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"123")
    lines = provenance_markdown(provenance(files={"data": path}, seed=7, device="cpu"))
    assert lines[0] == "## Provenance"
    for line in lines[1:]:  # the finetune report's rule: no number outside code spans
        outside = re.sub(r"`[^`]*`", "", line)
        assert not re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", outside), line
