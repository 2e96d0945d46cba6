"""turboflow.storage: where videos go and I2V images come from.

- `stores.py`: the seams, `OutputStore` and `ImageSource` Protocols, and the typed storage errors.
- `keys.py`: the key layout and the image confinement rule every store shares (pure).
- `s3.py`: S3Store (any S3 API). `local.py`: LocalDirectoryStore (a directory or NFS volume).
- `cli.py`: `turboflow model-cache warm` (page-cache warming of model caches on GPU nodes).
"""
