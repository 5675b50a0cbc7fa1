"""The synthetic dataset, the thing dsdiff makes: one package from specification to files.

- ``spec``: ids, generation groups, prompt records, ``dataset.json``, the checked :class:`GenerationPlan`;
- ``store``: the folder on disk (atomic files, manifest shards, config check, compaction) and
  ``store_sample``, the one way a generated sample is written;
- ``predict``: generation as Lightning prediction (DDP, resumable) with its writer;
- ``dataset``: the cached reader and the on-the-fly stream (training sets);
- ``export``: a VOC layout or a Hugging Face ``datasets`` folder.
"""
