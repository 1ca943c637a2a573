"""The experiment catalogue (``configs/experiments.yaml``): which config reproduces which paper
setting, and what the paper (or its authors' code) reports for it.

An entry names its config; the model, method, task and dataset of a paper point are read from
that config, so the catalogue never repeats them. The file's own header documents every field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import ConfigError, load_config

DEFAULT_CATALOGUE = Path(__file__).resolve().parents[3] / "configs" / "experiments.yaml"

# What a paper can report for a setting: accuracies in percent as printed, counts as numbers.
REPORTED_KEYS = ("top1", "top5", "miou", "params", "macs", "dynamic_macs")
_ENTRY_KEYS = {"config", "paper", "setting", "table", "source", "reported", "approx",
               "unverified"}
_PAPER_KEYS = {"title", "authors", "venue", "url", "code"}


@dataclass(frozen=True)
class Entry:
    config: Path                     # absolute path of the config file
    paper: str
    setting: str
    table: str | None
    source: str
    reported: dict[str, float]
    approx: tuple[str, ...] = ()
    unverified: str = ""


@dataclass(frozen=True)
class Catalogue:
    path: Path
    papers: dict[str, dict[str, str]]
    entries: list[Entry] = field(default_factory=list)


@dataclass(frozen=True)
class PaperPoint:
    """A catalogue entry resolved through its config: where it goes on a plot."""
    entry: Entry
    task: str
    dataset: str
    model: str
    method: str


def dataset_name(task: str, data_root: str, layout: str) -> str:
    """The dataset a run or config is about: the last component of ``data.root`` for
    classification, the layout (cityscapes, voc) for segmentation."""
    if task == "segmentation":
        return layout
    return Path(str(data_root).rstrip("/")).name or str(data_root)


def _entry(raw: dict, index: int, base: Path, papers: dict) -> Entry:
    where = f"experiments[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                          f"(expected {sorted(_ENTRY_KEYS)})")
    for key in ("config", "paper", "setting", "source"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    if raw["paper"] not in papers:
        raise ConfigError(f"{where}: paper {raw['paper']!r} is not one of {sorted(papers)}")
    reported = raw.get("reported") or {}
    for key, value in reported.items():
        if key not in REPORTED_KEYS:
            raise ConfigError(f"{where}.reported: unknown key {key!r} (expected {REPORTED_KEYS})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.reported.{key}: expected a number, got {value!r}")
    approx = tuple(raw.get("approx") or ())
    if set(approx) - set(reported):
        raise ConfigError(f"{where}.approx: {sorted(set(approx) - set(reported))[0]!r} is not "
                          "a reported key")
    return Entry(config=(base / raw["config"]).resolve(), paper=raw["paper"],
                 setting=raw["setting"], table=raw.get("table"), source=raw["source"],
                 reported={k: float(v) for k, v in reported.items()}, approx=approx,
                 unverified=str(raw.get("unverified") or ""))


def load_catalogue(path: str | Path = DEFAULT_CATALOGUE) -> Catalogue:
    """The validated catalogue; a bad file is a ConfigError naming the entry and key."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"experiment catalogue not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # yaml's own errors are several lines long
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict) or set(raw) != {"papers", "experiments"}:
        raise ConfigError(f"{path}: expected the top-level keys 'papers' and 'experiments'")
    papers = raw["papers"] or {}
    for key, paper in papers.items():
        if not isinstance(paper, dict) or set(paper) - _PAPER_KEYS or "title" not in paper:
            raise ConfigError(f"{path}: papers.{key} needs a title and only {sorted(_PAPER_KEYS)}")
    try:
        entries = [_entry(e, i, path.parent, papers) for i, e in enumerate(raw["experiments"])]
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return Catalogue(path, papers, entries)


def resolve(entry: Entry) -> PaperPoint:
    """The task, dataset, model and method of an entry, read from its config."""
    cfg = load_config(entry.config)
    return PaperPoint(entry, cfg.task, dataset_name(cfg.task, cfg.data.root, cfg.data.layout),
                      cfg.model.name, cfg.method.name)
