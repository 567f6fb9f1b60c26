"""TFDS builders over the dataset parsers: prepare once into ArrayRecord, read without TensorFlow.

    from medtransfer_jax.data.builders import tfds_builder
    tfds_builder.prepare('breast', manual_dir='/data/busi', data_dir='/data/tfds')
    # then data.tfds_data_dir='/data/tfds' makes get_splits read the prepared files.

Each dataset ``X`` gets a ``tfds.core.GeneratorBasedBuilder`` named ``medtransfer_X`` with the
parser's ``MANUAL_DOWNLOAD_INSTRUCTIONS``; it generates one split ``full`` (the study's folds
are made by splits.py) with features ``image`` (PNG, decoded by the parser so label rules,
16-bit scaling and MRNet slicing happen once), ``label``, ``id``, ``group`` and ``meta``
(JSON). Images are PNG-encoded with PIL and handed to TFDS as bytes, so preparing works
without TensorFlow too (TFDS would otherwise encode with ``tf.image``); reading uses
``tfds.data_source`` (ArrayRecord + grain-compatible random access).

On first read the per-example columns (label, id, group, metadata) are collected without
decoding images and cached next to the prepared files, so splitting never decodes.
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Dict

import numpy as np
from PIL import Image

from medtransfer_jax.data.base import DataError, Source, _as_object_array
from medtransfer_jax.data.builders import parsers
from medtransfer_jax.data.sources import Example, _column, decode_image

log = logging.getLogger(__name__)

VERSION = "1.0.0"
COLUMNS_FILE = "medtransfer_columns.json"
#: The meta field that carries an example's path under the download (fold-CSV matching).
RELPATH_KEY = "_relpath"
SPLIT = "full"  # one split; the study's folds are made by splits.py ("all" is reserved by TFDS)


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tensorflow-datasets is a dependency
        raise DataError("tensorflow-datasets is required for TFDS builders: pip install "
                        "tensorflow-datasets") from e
    return tfds


def tfds_name(name: str) -> str:
    return f"medtransfer_{name}"


def _load_example(ex: Example, channels: int) -> np.ndarray:
    image = (ex.loader or decode_image)(ex.path)
    if channels == 1 and image.ndim == 3:
        image = np.asarray(Image.fromarray(image).convert("L"))
    if channels == 3 and image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    if image.ndim == 2:
        image = image[..., None]
    return image


def _png_bytes(image: np.ndarray) -> io.BytesIO:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    buf.seek(0)
    return buf


_CLASSES: Dict[str, type] = {}


def _epath():
    from etils import epath
    return epath


def builder_class(name: str):
    """The (cached) GeneratorBasedBuilder subclass for dataset ``name``."""
    if name in _CLASSES:
        return _CLASSES[name]
    tfds = _tfds()
    parser = parsers.get_builder(name)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, parser.CHANNELS), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=list(parser.CLASS_NAMES)),
                "id": tfds.features.Text(),
                "group": tfds.features.Text(),
                "meta": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage=getattr(parser, "HOMEPAGE", None),
        )

    def _split_generators(self, dl_manager):
        return {SPLIT: self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, root):
        for ex in self.PARSER.examples(root, self.DATA_CFG):
            image = _load_example(ex, self.PARSER.CHANNELS)
            # The file's path under the download travels in meta: the paper's fold CSVs
            # name files, and an id is not always one (ISIC 'ISIC_0024306', CBIS '<key>#<abn>').
            meta = dict(ex.meta, **{RELPATH_KEY: ex.relpath} if ex.relpath else {})
            yield ex.id, {"image": _png_bytes(image), "label": int(ex.label), "id": ex.id,
                          "group": ex.group, "meta": json.dumps(meta, default=str)}

    body = {
        "__doc__": parser.__doc__,
        "__module__": __name__,
        # TFDS locates a builder's files through importlib_resources (not always installed);
        # give it the path directly.
        "code_path": _epath().Path(__file__),
        "VERSION": tfds.core.Version(VERSION),
        "RELEASE_NOTES": {VERSION: "First release."},
        "MANUAL_DOWNLOAD_INSTRUCTIONS": parser.MANUAL_DOWNLOAD_INSTRUCTIONS,
        "PARSER": parser,
        "DATA_CFG": None,  # set by prepare(): the data config passed to the parser
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
    }
    cls_name = "Medtransfer" + "".join(p.capitalize() for p in name.split("_"))
    cls = type(cls_name, (tfds.core.GeneratorBasedBuilder,), body)
    _CLASSES[name] = cls
    return cls


def prepare(name: str, manual_dir: str, data_dir: str, cfg=None):
    """Parses ``manual_dir`` and writes ArrayRecord files under ``data_dir``; returns the builder."""
    tfds = _tfds()
    cls = builder_class(name)
    cls.DATA_CFG = cfg
    builder = cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


class TfdsSource(Source):
    """A prepared ``medtransfer_<name>`` dataset read with ``tfds.data_source`` (no TensorFlow)."""

    def __init__(self, name: str, data_dir: str):
        tfds = _tfds()
        self.name = name
        self.data_dir = data_dir
        cls = builder_class(name)
        self._builder = cls(data_dir=data_dir, file_format="array_record")
        if not self._builder.is_prepared():
            raise DataError(f"{tfds_name(name)} is not prepared under {data_dir}; run "
                            f"medtransfer_jax.data.builders.tfds_builder.prepare({name!r}, manual_dir=..., "
                            f"data_dir={data_dir!r}) first")
        self._ds = None
        self.class_names = tuple(cls.PARSER.CLASS_NAMES)
        cols = self._columns(tfds)
        self.labels = np.asarray(cols["label"], np.int64)
        self.ids = _as_object_array(cols["id"])
        self.groups = _as_object_array(cols["group"])
        metas = [json.loads(m) for m in cols["meta"]]
        # prepared before the relpath travelled: the id (right where it is the file's path)
        self.relpaths = [m.pop(RELPATH_KEY, i) for m, i in zip(metas, self.ids)]
        keys = sorted({k for m in metas for k in m})
        self.meta = {k: _column([m.get(k) for m in metas]) for k in keys}

    def _source(self):
        if self._ds is None:
            if self._builder is None:
                self._builder = builder_class(self.name)(data_dir=self.data_dir, file_format="array_record")
            self._ds = self._builder.as_data_source(split=SPLIT)
        return self._ds

    def _columns(self, tfds) -> Dict[str, Any]:
        path = os.path.join(str(self._builder.data_dir), COLUMNS_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        ds = self._builder.as_data_source(split=SPLIT, decoders={"image": tfds.decode.SkipDecoding()})
        cols = {"label": [], "id": [], "group": [], "meta": []}
        for i in range(len(ds)):
            r = ds[i]
            cols["label"].append(int(r["label"]))
            for k in ("id", "group", "meta"):
                v = r[k]
                cols[k].append(v.decode() if isinstance(v, bytes) else str(v))
        try:
            with open(path, "w") as f:
                json.dump(cols, f)
        except OSError:  # read-only data dir: recompute next time
            log.info("could not cache %s", path)
        return cols

    def load_image(self, index: int) -> np.ndarray:
        image = np.asarray(self._source()[int(index)]["image"])
        return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None  # builder and reader are re-opened lazily in worker processes
        state["_builder"] = None
        return state
