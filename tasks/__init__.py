"""The DVC stages, one module each; a stage imports wsss.lib and wsss.models only, never another stage.
Their table (name, command, module, params) is :mod:`wsss.tasks.stages`, which no stage imports."""
