"""Host-side tools: train Keras classifiers and convert them to int8 TFLite with an in-graph Grad-CAM head."""
