"""splitserve.queue"""
