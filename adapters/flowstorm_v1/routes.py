"""Flowstorm Socket V1 over WebSocket (being written)."""

from fastapi import APIRouter

router = APIRouter(tags=["Flowstorm Socket V1"])
