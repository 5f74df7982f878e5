"""The runtime the stages share: the run config and the stage registry (each stage declared once, and the config
view that holds a stage to what it declared), the output layout, model cards and ensembles, the Ray session,
console and progress, precision choice, fault hooks for tests, Ray Train's worker loop and the saliency methods."""
