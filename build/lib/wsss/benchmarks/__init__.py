"""Speed benchmarks (``wsss bench``)."""

SIZE_NAMES = ("cpu", "vit-b", "smoke")  # benchmarks.bench.SIZES, named here so `wsss --help` stays light
