"""Write the token data and signing key the textenc build config names.

The sentences come with Python itself: prose sentences split out of the docstrings of a
fixed list of standard-library modules (read with ``ast``, nothing imported), deduplicated
case-insensitively, and assigned to eval / calibration / train by a hash of their text, so
the splits are disjoint and stable. Writes into examples/textenc/work/: eval.npz, calib.npz,
train.npz (int64 ``input_ids`` and ``attention_mask`` [N, 64]), the sentences of each split
as .txt beside them, and a signing key pair under keys/. Re-running reuses finished outputs.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
SPLITS = {"eval": 300, "calib": 200, "train": 1000}

# Pure-Python stdlib modules with prose docstrings; a file missing from this Python is skipped.
STDLIB_FILES = (
    "argparse.py",
    "ast.py",
    "bdb.py",
    "calendar.py",
    "cmd.py",
    "codecs.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "doctest.py",
    "email/message.py",
    "email/utils.py",
    "enum.py",
    "fractions.py",
    "ftplib.py",
    "functools.py",
    "gettext.py",
    "gzip.py",
    "heapq.py",
    "http/client.py",
    "http/cookiejar.py",
    "http/server.py",
    "imaplib.py",
    "inspect.py",
    "ipaddress.py",
    "json/__init__.py",
    "json/decoder.py",
    "locale.py",
    "logging/__init__.py",
    "logging/handlers.py",
    "mailbox.py",
    "multiprocessing/pool.py",
    "optparse.py",
    "os.py",
    "pathlib.py",
    "pdb.py",
    "pickle.py",
    "pickletools.py",
    "pprint.py",
    "pydoc.py",
    "queue.py",
    "random.py",
    "sched.py",
    "selectors.py",
    "shlex.py",
    "shutil.py",
    "smtplib.py",
    "socket.py",
    "socketserver.py",
    "ssl.py",
    "statistics.py",
    "string.py",
    "subprocess.py",
    "tarfile.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "timeit.py",
    "trace.py",
    "traceback.py",
    "typing.py",
    "unittest/case.py",
    "unittest/mock.py",
    "urllib/parse.py",
    "urllib/request.py",
    "uuid.py",
    "warnings.py",
    "weakref.py",
    "xml/dom/minidom.py",
    "zipfile.py",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# A capitalised prose sentence ending in a full stop: no code, paths, markup or doctest prompts.
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[a-z)][.]$")


def _is_prose(s: str) -> bool:
    words = s.split()
    if not 6 <= len(words) <= 40 or not _PROSE.match(s):
        return False
    chars = s.replace(" ", "")
    return sum(c.isalpha() for c in chars) >= 0.8 * len(chars)


def stdlib_sentences() -> list[str]:
    """Every distinct prose sentence in the listed modules' docstrings, in file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    seen: set[str] = set()
    for rel in STDLIB_FILES:
        path = root / rel
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            ):
                continue
            for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                for s in _SENTENCE_END.split(" ".join(para.split())):
                    key = s.lower()
                    if _is_prose(s) and key not in seen:
                        seen.add(key)
                        out.append(s)
    return out


def split_sentences(sentences: list[str]) -> dict[str, list[str]]:
    """Disjoint eval / calib / train lists, chosen by a hash of each sentence (order-independent)."""
    need = sum(SPLITS.values())
    if len(sentences) < need:
        raise RuntimeError(
            f"only {len(sentences)} docstring sentences found in this Python's stdlib; need {need}"
        )
    ranked = sorted(sentences, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    out: dict[str, list[str]] = {}
    start = 0
    for name, n in SPLITS.items():
        out[name] = ranked[start : start + n]
        start += n
    return out


def make_data(work: Path) -> dict[str, int]:
    from examples.textenc.model import tokenize

    counts = {}
    for name, texts in split_sentences(stdlib_sentences()).items():
        feeds = tokenize(texts)
        np.savez(work / f"{name}.npz", **feeds)  # type: ignore[arg-type]
        (work / f"{name}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        counts[name] = len(texts)
    return counts


def prepare(work: Path = WORK, force: bool = False, quiet: bool = False) -> None:
    from examples.common import ensure_signing_key, stderr_say

    say = stderr_say(quiet)
    work.mkdir(parents=True, exist_ok=True)
    if force or not all((work / f"{name}.npz").exists() for name in SPLITS):
        counts = make_data(work)
        say(f"textenc data written to {work}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    ensure_signing_key(work, say)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--force", action="store_true", help="rewrite the data")
    prepare(force=ap.parse_args().force)
