"""``llmfast train``'s machinery: the loop (:mod:`.loop`), processes and sharding (:mod:`.distributed`), resumable
checkpoints and the single-file export (:mod:`.checkpoint`), token data and ``llmfast prepare`` (:mod:`.data`)."""
