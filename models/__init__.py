"""Models: the synthetic specimen generator, the particle U-Net, training, export, evaluation.

``models.synthetic`` needs only numpy and scipy (the simulator imports it); everything else here
needs torch and runs only for training and export. The daemon never imports this package: it
loads the shipped artifacts in ``models/weights`` (ONNX + model card JSON).
"""
