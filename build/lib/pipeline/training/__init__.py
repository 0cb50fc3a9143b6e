"""What every training rung shares: its inputs, classifiers, the Keras fit, the contract, the advice."""
