"""The five stages - partition, train, score, evaluate, saliency - each declared once in
``dermray.runtime.registry`` and independent of each other (no stage imports another)."""
