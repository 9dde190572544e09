"""splitserve.kernels"""
