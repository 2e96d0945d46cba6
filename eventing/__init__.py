"""turboflow.eventing"""
