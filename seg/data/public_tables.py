"""The class tables of public datasets, as their owners define them.

- Cityscapes: mcordts/cityscapesScripts `helpers/labels.py`: the 19 training classes (trainId 0..18),
  their names and colours, and the label ids (`*_gtFine_labelIds.png` values) that map to them; the
  other ids of labels.py (0..33) are ignored, as the benchmark does, and a value past them is refused.
- ADE20K SceneParsing: CSAILVision/sceneparsing `objectInfo150.txt`: 150 classes, the first of each
  entry's names; annotation value i + 1 is class i and 0 ("other") is ignored.
- Pascal VOC 2012: 21 classes; the mask's palette index is the class, 255 (the void border) is
  ignored; colours are the standard bit-interleaved VOC colour map.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from seg.data.classes import ClassTable, default_class_table, load_class_table
from seg.data.decode import MaskDecoder
from seg.runtime.errors import SegError

# (name, label id in *_gtFine_labelIds.png, colour); trainId = position in this list
CITYSCAPES = [
    ("road", 7, (128, 64, 128)), ("sidewalk", 8, (244, 35, 232)), ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)), ("fence", 13, (190, 153, 153)), ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)), ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)), ("terrain", 22, (152, 251, 152)), ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)), ("rider", 25, (255, 0, 0)), ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)), ("bus", 28, (0, 60, 100)), ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)), ("bicycle", 33, (119, 11, 32)),
]

CITYSCAPES_IDS = 34  # labels.py's ids 0..33 (license plate, -1, never appears in a labelIds image)

ADE20K = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
]

VOC = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def voc_colormap(n: int = 256) -> np.ndarray:
    """[n, 3] uint8: the VOC colour of index i spreads i's bits over R, G, B, highest bits first."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _ade_colors(n: int) -> list[tuple[int, int, int]]:
    # ADE20K publishes no colour table in text; distinct, fixed colours for drawing only
    rng = np.random.default_rng(150)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(n)]  # type: ignore[misc]


def cityscapes_table() -> ClassTable:
    used = {label_id for _, label_id, _ in CITYSCAPES}
    return ClassTable(names=tuple(n for n, _, _ in CITYSCAPES), raw_values=tuple((i,) for _, i, _ in CITYSCAPES),
                      colors=tuple(c for _, _, c in CITYSCAPES),
                      # ids 0..33 that are not trained are ignored, as the benchmark does; any other value
                      # is no Cityscapes label id and is refused naming the file (the official
                      # evaluation stops with "Unknown label" there)
                      ignore_values=tuple(v for v in range(CITYSCAPES_IDS) if v not in used))


def ade20k_table() -> ClassTable:
    return ClassTable(names=tuple(ADE20K), raw_values=tuple((i + 1,) for i in range(len(ADE20K))),
                      colors=tuple(_ade_colors(len(ADE20K))), ignore_values=(0,))


def voc_table() -> ClassTable:
    cmap = voc_colormap()
    return ClassTable(names=tuple(VOC), raw_values=tuple((i,) for i in range(len(VOC))),
                      colors=tuple(tuple(int(v) for v in cmap[i]) for i in range(len(VOC))),  # type: ignore[misc]
                      ignore_values=(255,))


def builtin_table(layout: str) -> Optional[ClassTable]:
    """The table a layout brings (None for plain folders, whose classes only the user knows)."""
    return {"falcon": default_class_table, "cityscapes": cityscapes_table, "ade20k": ade20k_table,
            "voc": voc_table}.get(layout, lambda: None)()


def table_for(layout: str, classes: Optional[str]) -> ClassTable:
    """--classes (a JSON file, or names in id order) when given, else the layout's own table."""
    if classes is not None:
        return load_class_table(classes)
    table = builtin_table(layout)
    if table is None:
        raise SegError(f"the {layout} layout has no class table of its own: pass --classes with the class "
                       "names in id order (e.g. --classes ground,sky,tree for masks of ids 0, 1, 2; 255 is "
                       "ignored) or a JSON table (`seg classes --data ROOT` prints one from your masks' values)")
    return table


def decoder_for(layout: str, table: ClassTable) -> MaskDecoder:
    """VOC masks saved as colours keep the void border's colour (palette index 255): it is ignored."""
    void = (tuple(int(v) for v in voc_colormap()[255]),) if layout == "voc" else ()
    return MaskDecoder.of(table, void)  # type: ignore[arg-type]
