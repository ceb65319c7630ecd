"""Decomposition IDs: one grammar for every method.

::

    <method>:demo                                   the method's bundled demo decomposition
    <method>:hf:<owner>/<repo>[/<subdir>][@<rev>]   a Hugging Face Hub repo (normal cache, offline mode)
    <method>:wandb:<entity>/<project>/<run>         a wandb run's files (public API)
    <method>:<path>                                 a local directory or file
    <short id>                                      a form a plugin owns (SPD: ``s-1a2b3c4d``)

Parsing is pure (no I/O): :func:`parse_decomposition_id` checks the grammar and the method
name; :func:`fetch_source` turns hf/wandb/local sources into a local path. The normalised form
(:attr:`DecompositionId.normalized`) and its filesystem-safe :attr:`storage_key` key every stored
result, so ``transcoder:./x`` and ``transcoder:/abs/x`` share results.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from spd_host.errors import DecompositionIdError, SourceNotFoundError
from spd_host.paths import expand_user

ACCEPTED_FORMS = (
    "<method>:demo",
    "<method>:hf:<owner>/<repo>[/<subdir>][@<revision>]",
    "<method>:wandb:<entity>/<project>/<run>",
    "<method>:<local path>",
)

_HF_RE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<subdir>(?:/[^@]+)?)(?:@(?P<rev>[^@/][^@]*))?$"
)
_WANDB_RE = re.compile(r"^(?P<entity>[\w.-]+)/(?P<project>[\w.-]+)/(?P<run>[\w.-]+)$")
_METHOD_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


class SourceKind(StrEnum):
    DEMO = "demo"
    LOCAL = "local"
    HF = "hf"
    WANDB = "wandb"
    SHORT = "short"


class DecompositionId(BaseModel):
    """A parsed decomposition ID. Build with :func:`parse_decomposition_id`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    kind: SourceKind
    raw: str
    path: Path | None = None
    hf_repo: str | None = None
    hf_subdir: str | None = None
    hf_revision: str | None = None
    wandb_path: str | None = None
    short_id: str | None = None

    @property
    def source(self) -> str:
        """The source part of the normalised ID (everything after ``<method>:``)."""
        if self.kind is SourceKind.DEMO:
            return "demo"
        if self.kind is SourceKind.LOCAL:
            return str(self.path)
        if self.kind is SourceKind.HF:
            sub = f"/{self.hf_subdir}" if self.hf_subdir else ""
            rev = f"@{self.hf_revision}" if self.hf_revision else ""
            return f"hf:{self.hf_repo}{sub}{rev}"
        if self.kind is SourceKind.WANDB:
            return f"wandb:{self.wandb_path}"
        return str(self.short_id)

    @property
    def normalized(self) -> str:
        return f"{self.method}:{self.source}"

    @property
    def storage_key(self) -> str:
        """Filesystem-safe, collision-resistant key for stored results."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", self.normalized).strip("_")[-80:]
        digest = hashlib.sha256(self.normalized.encode()).hexdigest()[:10]
        return f"{readable}-{digest}"

    def __str__(self) -> str:
        return self.normalized


def parse_decomposition_id(
    raw: str,
    *,
    methods: Iterable[str],
    short_id_patterns: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> DecompositionId:
    """Parse ``raw`` against the installed ``methods`` and their short-ID patterns.

    Raises :class:`DecompositionIdError` listing the installed methods and accepted forms.
    """
    known = sorted(methods)
    raw = raw.strip()
    for method, pattern in (short_id_patterns or {}).items():
        if re.fullmatch(pattern, raw):
            return DecompositionId(method=method, kind=SourceKind.SHORT, raw=raw, short_id=raw)

    method, sep, source = raw.partition(":")
    if not sep or not method or not source:
        raise _id_error(f"{raw!r} is not a decomposition ID", known, short_id_patterns, raw)
    if not _METHOD_RE.match(method):
        raise _id_error(f"{method!r} is not a valid method name", known, short_id_patterns, raw)
    if method not in known:
        raise _id_error(f"unknown method {method!r} in {raw!r}", known, short_id_patterns, raw)

    if source == "demo":
        return DecompositionId(method=method, kind=SourceKind.DEMO, raw=raw)
    if source.startswith("hf:"):
        m = _HF_RE.match(source[3:])
        if not m:
            raise _id_error(
                f"{source!r} is not a Hub source; expected hf:<owner>/<repo>[/<subdir>][@<revision>]",
                known,
                short_id_patterns,
            )
        subdir = m["subdir"].strip("/") or None
        return DecompositionId(
            method=method,
            kind=SourceKind.HF,
            raw=raw,
            hf_repo=m["repo"],
            hf_subdir=subdir,
            hf_revision=m["rev"],
        )
    if source.startswith("wandb:"):
        m = _WANDB_RE.match(source[6:])
        if not m:
            raise _id_error(
                f"{source!r} is not a wandb source; expected wandb:<entity>/<project>/<run>",
                known,
                short_id_patterns,
            )
        return DecompositionId(method=method, kind=SourceKind.WANDB, raw=raw, wandb_path=source[6:])
    own_pattern = (short_id_patterns or {}).get(method)
    if own_pattern and re.fullmatch(own_pattern, source):
        return DecompositionId(method=method, kind=SourceKind.SHORT, raw=raw, short_id=source)
    base = cwd or Path.cwd()
    path = expand_user(source, "decomposition path")
    path = (path if path.is_absolute() else base / path).resolve()
    return DecompositionId(method=method, kind=SourceKind.LOCAL, raw=raw, path=path)


def known_ids(methods: Iterable[str]) -> list[str]:
    """IDs a user plausibly meant: every method's demo, and every ID with a stored harvest."""
    import json

    from spd_host.paths import home

    out = [f"{m}:demo" for m in sorted(methods)]
    try:
        results = home() / "results"
        for meta in sorted(results.glob("*/harvest/*/harvest.json"))[:500]:
            try:
                did = json.loads(meta.read_text()).get("decomposition_id")
            except (OSError, ValueError):
                continue
            if isinstance(did, str) and did not in out:
                out.append(did)
    except OSError:
        pass
    return out


def did_you_mean(raw: str, methods: Iterable[str]) -> str:
    """`` Did you mean 'transcoder:demo'?`` for a near miss (edit ratio >= 0.75), else ''."""
    import difflib

    match = difflib.get_close_matches(raw, known_ids(methods), n=1, cutoff=0.75)
    return f" Did you mean {match[0]!r}?" if match and match[0] != raw else ""


def _id_error(
    what: str, known: Sequence[str], short_id_patterns: Mapping[str, str] | None, raw: str = ""
) -> DecompositionIdError:
    installed = ", ".join(known) if known else "(none installed)"
    forms = "; ".join(ACCEPTED_FORMS)
    shorts = ""
    if short_id_patterns:
        shorts = "; short IDs: " + ", ".join(f"{m} ({p})" for m, p in short_id_patterns.items())
    return DecompositionIdError(
        f"{what}.{did_you_mean(raw, known) if raw else ''} Installed methods: {installed}.",
        hint=f"accepted forms: {forms}{shorts}. `spd-host plugins` lists what is installed.",
    )


def fetch_source(
    did: DecompositionId,
    *,
    allow_patterns: Sequence[str] | None = None,
    cache_root: Path | None = None,
) -> Path:
    """Return a local path holding the decomposition's files.

    - local: the path itself (must exist);
    - hf: ``huggingface_hub.snapshot_download`` (honours ``HF_HOME`` and ``HF_HUB_OFFLINE``),
      then the sub-directory;
    - wandb: the run's files downloaded once with wandb's public API into the cache.

    Demo and short IDs are the owning plugin's to resolve; asking here is a programming error.
    """
    if did.kind is SourceKind.LOCAL:
        assert did.path is not None
        if not did.path.exists():
            raise SourceNotFoundError(
                f"{did.raw}: no such file or directory: {did.path}."
                + did_you_mean(did.raw, [did.method]),
                hint="check the path, or use hf:<owner>/<repo> for a Hub repo",
            )
        return did.path
    if did.kind is SourceKind.HF:
        return _fetch_hf(did, allow_patterns)
    if did.kind is SourceKind.WANDB:
        return fetch_wandb_run(
            str(did.wandb_path), allow_patterns=allow_patterns, cache_root=cache_root
        )
    raise ValueError(
        f"{did.kind.value} sources are resolved by the owning plugin, not fetch_source"
    )


def _fetch_hf(did: DecompositionId, allow_patterns: Sequence[str] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns: list[str] | None = None
    if allow_patterns is not None:
        prefix = f"{did.hf_subdir}/" if did.hf_subdir else ""
        patterns = [prefix + p for p in allow_patterns]
    elif did.hf_subdir:
        patterns = [f"{did.hf_subdir}/*", f"{did.hf_subdir}/**"]
    try:
        root = Path(
            snapshot_download(
                repo_id=str(did.hf_repo), revision=did.hf_revision, allow_patterns=patterns
            )
        )
    except LocalEntryNotFoundError as err:
        raise SourceNotFoundError(
            f"{did.raw}: Hub repo {did.hf_repo!r} is not in the local cache and cannot be downloaded ({err})",
            hint="go online, or unset HF_HUB_OFFLINE, or point HF_HOME at a cache that holds it",
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise SourceNotFoundError(
            f"{did.raw}: could not fetch Hub repo {did.hf_repo!r}: {err}",
            hint="check the repo name, the revision and your HF token (HF_TOKEN)",
        ) from err
    path = root / did.hf_subdir if did.hf_subdir else root
    if not path.exists():
        raise SourceNotFoundError(
            f"{did.raw}: sub-directory {did.hf_subdir!r} not found in Hub repo {did.hf_repo!r}",
            hint=f"available entries: {sorted(p.name for p in root.iterdir())}",
        )
    return path


def fetch_wandb_run(
    run_path: str,
    *,
    allow_patterns: Sequence[str] | None = None,
    cache_root: Path | None = None,
) -> Path:
    """Download a wandb run's files (matching ``allow_patterns``, fnmatch) into the cache.

    Files already present are not downloaded again, so a second call works offline.
    """
    import fnmatch

    from spd_host.paths import cache_dir

    target = (cache_root or cache_dir("wandb")) / run_path.replace("/", "__")
    marker = target / ".complete"
    if marker.exists():
        return target
    try:
        import wandb

        run = wandb.Api().run(run_path)
        files = list(run.files())
    except Exception as err:  # wandb raises many unrelated types (CommError, ValueError, ...)
        raise SourceNotFoundError(
            f"wandb run {run_path!r} could not be read: {err}",
            hint="check entity/project/run, and WANDB_API_KEY for private projects",
        ) from err
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        if allow_patterns and not any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
            continue
        f.download(root=str(target), replace=False, exist_ok=True)
    marker.write_text(run_path)
    return target
