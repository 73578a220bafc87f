"""Training, evaluation and export of the shipped models (needs torch, ``pip install -e
'.[train]'``): the particle U-Net, the field classifier, the lens autoencoder, the real-data
splits and the accuracy harness. The daemon never imports this package; it loads the ONNX files
and model cards it writes."""
