"""splitserve.config"""
