"""splitserve.model"""
