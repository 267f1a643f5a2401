"""The DVC stages, one module each; a stage imports wsss.lib and wsss.models only, never another stage."""
