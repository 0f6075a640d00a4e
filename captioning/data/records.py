"""The one record shape every dataset is read into."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Record:
    """One image and its reference captions.

    image_id: unique within the dataset (Flickr: the file name; COCO: the numeric id as text).
    path: absolute path of the image file.
    split: train, val, test (COCO Karpathy also restval).
    captions: the human captions, as written in the source.
    """

    image_id: str
    path: str
    split: str
    captions: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "image_id": self.image_id,
            "path": self.path,
            "split": self.split,
            "captions": list(self.captions),
        }


@dataclass
class Dataset:
    """The records of one dataset, plus what the loader dropped and why."""

    name: str
    records: list[Record]
    dropped: list[str] = field(default_factory=list)

    def splits(self) -> dict[str, list[Record]]:
        result: dict[str, list[Record]] = {}
        for record in self.records:
            result.setdefault(record.split, []).append(record)
        return result
