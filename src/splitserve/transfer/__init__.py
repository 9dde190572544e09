"""splitserve.transfer"""
