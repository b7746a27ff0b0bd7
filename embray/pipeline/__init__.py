"""The build pipeline: scan -> plan -> embed -> shards -> commit (see :mod:`embray.pipeline.run`)."""
