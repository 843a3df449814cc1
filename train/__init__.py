"""facekit training: recognizer backbones, margin losses, checkpoints, the hourglass aligner and trainers."""
