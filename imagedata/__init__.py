"""The data contract shared by training (model_training/) and the case index (index/).

One item type (`imagedata.item.Item`: an image loader with its cache key, labels, report and
identifiers), one manifest reader (`imagedata.manifest`), one image loader (`imagedata.images`:
DICOM through the node's own reader, PNG/JPEG at 8 or 16 bits) and one maker of in-memory phantom
items (`imagedata.phantom_items`). Training and the index import this package; it imports only
`models` (labels, preprocessing, digests) and `phantoms`, never training or index code, so the
index builds its cases without importing training.
"""
