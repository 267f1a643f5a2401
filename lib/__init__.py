"""The library the stages share: config, data, metrics, training loop, artifacts, mask rule, tracking, storage."""
