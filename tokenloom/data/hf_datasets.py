"""A Hugging Face ``datasets`` data set saved on disk, as ``{"image", "label", "caption"}`` items.

Local only: ``root`` is a folder written by ``Dataset.save_to_disk`` (or a ``DatasetDict`` folder, with
``split``); nothing is downloaded. Columns are named by the recipe (``image_column``, ``label_column``,
``caption_column``); images (PIL images, as the ``Image`` feature decodes them, or encoded bytes) are prepared
as in :func:`tokenloom.data.image_folder.load_rgb`. ``datasets`` is optional: without it this data set raises an
``ImportError`` that says so.
"""

from __future__ import annotations

import io

from torch.utils.data import Dataset

from tokenloom.data.image_folder import load_rgb


class HFImageDataset(Dataset):
    """Rows of a local ``datasets`` folder (see the module docstring).

    Args:
        root: the ``save_to_disk`` folder; or an in-memory ``datasets.Dataset`` / any sequence of dict rows.
        split: for a ``DatasetDict`` folder.
        image_size: output side ``S``.
        image_column, label_column, caption_column: column names (label/caption None = absent).
    """

    def __init__(self, root, split: str | None = None, image_size: int = 32, image_column: str = "image",
                 label_column: str | None = "label", caption_column: str | None = None):
        if isinstance(root, str):
            try:
                import datasets
            except ImportError as err:
                raise ImportError("data name 'hf_datasets' needs the `datasets` package (pip install datasets)"
                                  ) from err
            data = datasets.load_from_disk(root)
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"split={split!r} is not one of the splits {sorted(data)} at {root!r}")
                data = data[split]
        else:
            data = root
        if len(data) == 0:
            raise ValueError(f"the data set at root={root!r} is empty")
        columns = set(data.column_names) if hasattr(data, "column_names") else set(data[0])
        for name, column in (("image_column", image_column), ("label_column", label_column),
                             ("caption_column", caption_column)):
            if column is not None and column not in columns:
                raise ValueError(f"{name}={column!r} is not a column of the data set; columns: {sorted(columns)}")
        self.data, self.image_size = data, image_size
        self.image_column, self.label_column, self.caption_column = image_column, label_column, caption_column

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        row = self.data[index]
        image = row[self.image_column]
        if isinstance(image, dict) and "bytes" in image:  # undecoded Image feature
            image = image["bytes"]
        if isinstance(image, (bytes, bytearray)):
            tensor = load_rgb(io.BytesIO(image), self.image_size)
        else:  # a PIL image
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            tensor = load_rgb(buffer, self.image_size)
        item = {"image": tensor}
        if self.label_column is not None:
            item["label"] = int(row[self.label_column])
        if self.caption_column is not None:
            item["caption"] = str(row[self.caption_column])
        return item


__all__ = ["HFImageDataset"]
