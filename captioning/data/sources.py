"""Where each dataset officially comes from: one list of archives per dataset.

Every URL is https, and every archive carries a published digest or a published file count:
- sha256 and size: TensorFlow Datasets' checksum files (COCO, Karpathy's caption_datasets.zip);
- md5: the digests that dataset loaders publish for the Flickr archives (the R torchvision
  loader and CMake builds for Flickr8k_Dataset.zip and Flickr8k_text.zip, a dataset loader
  script for flickr30k.tar.gz); MD5 still stops a damaged or swapped file;
- files: the published number of images (8,091 for Flickr8k, 31,783 for Flickr30k), counted
  in the archive's listing before anything is written. flickr30k-images.zip has no published
  digest and no published size, so this count and the layout are its check, and it is trusted
  on first use: the sha256 of the first copy acquired is recorded in the dataset's marker
  (.acquired.json), and a later acquisition (`acquire --force`, a mirror's copy) that differs
  is refused before unpacking (captioning/data/acquire.py). This catches a copy swapped or
  changed since; it cannot tell whether the first copy was the right one.
Where none is known `acquire` says, in one log line, what the archive is checked by.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Archive:
    """One official download.

    filename: name of the archive, also its name inside a mirror folder.
    url: where it is downloaded from when no mirror holds it.
    sha256: published digest, or None when no published digest is known.
    size: size in bytes, or None when unknown.
    extract_to: folder inside the dataset folder it is unpacked into.
    md5: published MD5, for archives whose only published digest is one.
    files: (glob pattern, count): how many members (by base name) the official archive holds.
    """

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None
    extract_to: str = "."
    md5: str | None = None
    files: tuple[str, int] | None = None


# Karpathy's splits of Flickr8k, Flickr30k and COCO, one zip holding all three JSON files.
KARPATHY = Archive(
    "caption_datasets.zip",
    "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
    "4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817",
    36745453,
)

_COCO = "https://images.cocodataset.org"

SOURCES: dict[str, list[Archive]] = {
    # The original University of Illinois links sit behind a request form; these
    # are the copies most tutorials and courses use. Flicker8k_Dataset/ (sic) + text files.
    "flickr8k": [
        Archive(
            "Flickr8k_Dataset.zip",
            "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
            md5="f18a1e2920de5bd84dae7cf08ec78978",
            files=("*.jpg", 8091),
        ),
        Archive(
            "Flickr8k_text.zip",
            "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
            md5="bf6c1abcb8e4a833b7f922104de18627",
        ),
    ],
    # Images: flickr30k-images/ (the form-gated original is flickr30k-images.tar.gz);
    # captions: results_20130124.token from the Denotation Graph release; split: Karpathy.
    "flickr30k": [
        Archive(
            "flickr30k-images.zip",
            "https://huggingface.co/datasets/nlphuji/flickr30k/resolve/main/flickr30k-images.zip",
            files=("*.jpg", 31783),
        ),
        Archive(
            "flickr30k.tar.gz",
            "https://shannon.cs.illinois.edu/DenotationGraph/data/flickr30k.tar.gz",
            md5="d3980ef9db5743acbd5bcd9394065067",
        ),
        KARPATHY,
    ],
    "mscoco": [
        Archive(
            "train2014.zip",
            f"{_COCO}/zips/train2014.zip",
            "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
            13510573713,
        ),
        Archive(
            "val2014.zip",
            f"{_COCO}/zips/val2014.zip",
            "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
            6645013297,
        ),
        Archive(
            "train2017.zip",
            f"{_COCO}/zips/train2017.zip",
            "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
            19336861798,
        ),
        Archive(
            "val2017.zip",
            f"{_COCO}/zips/val2017.zip",
            "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
            815585330,
        ),
        Archive(
            "annotations_trainval2014.zip",
            f"{_COCO}/annotations/annotations_trainval2014.zip",
            "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
            252872794,
        ),
        Archive(
            "annotations_trainval2017.zip",
            f"{_COCO}/annotations/annotations_trainval2017.zip",
            "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
            252907541,
        ),
        KARPATHY,
    ],
}


def sources_for(name: str) -> list[Archive]:
    """The archives of one dataset; KeyError lists the datasets that can be downloaded."""
    try:
        return SOURCES[name]
    except KeyError:
        known = ", ".join(sorted(SOURCES))
        raise KeyError(f"no download source for dataset {name!r}; known: {known}") from None
