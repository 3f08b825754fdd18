"""Run by tests/test_web_compreface.py with the venv of CompreFace's own Python SDK (not the
product's): the SDK's calls against a running `facemoe serve`, answers printed as one JSON
object. Usage: python compreface_sdk_client.py URL PORT KEY READ_ONLY_KEY PHOTO_DIR"""

import json
import sys
from pathlib import Path

from compreface import CompreFace

url, port, key, read_only_key, photos = sys.argv[1:6]
photos = Path(photos)
obama, obama2, small, biden = (str(photos / n) for n in (
    "obama.jpg", "obama2.jpg", "obama_small.jpg", "biden.jpg"))

server = CompreFace(url, port, {"prediction_count": 2, "det_prob_threshold": 0.5})
recognition = server.init_face_recognition(key)
faces, subjects = recognition.get_face_collection(), recognition.get_subjects()
out = {"add": faces.add(image_path=obama, subject="Barack Obama"),
       "add_bytes": faces.add(image_path=Path(biden).read_bytes(), subject="Joe Biden")}
out["faces"] = faces.list()
out["subjects"] = subjects.list()
out["recognize"] = recognition.recognize(image_path=obama2)
out["recognize_bytes"] = recognition.recognize(image_path=Path(biden).read_bytes(),
                                               options={"limit": 1, "face_plugins": "landmarks"})
out["verify_stored"] = faces.verify(image_path=obama2, image_id=out["add"]["image_id"])
verification = server.init_face_verification(key)
out["verify_same"] = verification.verify(source_image_path=obama, target_image_path=small)
out["verify_other"] = verification.verify(source_image_path=obama, target_image_path=biden)
out["detect"] = server.init_face_detection(key).detect(image_path=obama2)
reader = CompreFace(url, port).init_face_recognition(read_only_key)
out["read_only_recognize"] = reader.recognize(image_path=obama2)
out["read_only_add"] = reader.get_face_collection().add(image_path=obama2, subject="Barack Obama")
out["read_only_delete"] = reader.get_subjects().delete("Barack Obama")
out["delete_face"] = faces.delete(out["add_bytes"]["image_id"])
out["delete_subject"] = subjects.delete("Barack Obama")
out["subjects_after"] = subjects.list()
out["faces_after"] = faces.list()
print(json.dumps(out))
