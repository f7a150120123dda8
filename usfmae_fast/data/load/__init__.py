"""Load: a corpus (image folder, ``path,label`` CSV, ingest output, webdataset shards) ->
normalised batches. :mod:`.image_files` lists and reads the files and plans the epochs,
:mod:`.base` holds what both loaders share (configuration, epoch bookkeeping, decode),
:mod:`.torch_loader` the PyTorch datasets, transforms and loader, :mod:`.dali` the DALI loader,
and :mod:`.loader` ``make_loader``, which picks between them."""
