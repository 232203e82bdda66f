"""The choice lists of flags that a library module checks too, each written once: the command line
(its flag groups) offers them and the module that acts on them refuses anything else. Torch-free,
so `train.py --help` imports only this."""

#: predict --runtime, QAPredictor.load(runtime=...): auto picks ONNX Runtime when the folder holds
#: an exported model, else PyTorch.
RUNTIMES = ("auto", "torch", "onnxruntime")

#: predict --quantize, QAPredictor.load(quantize=...): PyTorch dynamic int8 Linear layers, or the
#: folder's model_int8.onnx in ONNX Runtime.
PREDICT_QUANTIZE = ("none", "int8")

#: export --quantize, export_model(quantize=...): static int8 calibrated on training questions, or
#: dynamic int8 (no calibration).
EXPORT_QUANTIZE = ("none", "int8", "int8-dynamic")

#: --loss_impl, kdqa.loss.resolve_loss_impl: the fused Triton loss, its PyTorch reference, or auto.
LOSS_IMPLS = ("auto", "triton", "torch")
