"""splitserve.control"""
