"""Data pipeline: video decoding and bucketing (:mod:`.video`), shards (:mod:`.shards`),
preprocessing (:mod:`.preprocess`) and the packing sampler (:mod:`.sampler`)."""
