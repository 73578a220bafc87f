"""Send frames from your own acquisition script to nanoscout (the daemon measures them).

Runs wherever your camera's Python runs -- the Windows acquisition PC (Gatan DigitalMicrograph,
Thermo Fisher Velox / AutoScript, SerialEM) -- and needs only ``pip install nanoscout`` there::

    python publish_from_acquisition.py tcp://ANALYSIS-PC:5555 10 tcp://ANALYSIS-PC:5556

Replace ``acquire()`` with your camera call; it returns the image (a 2-D numpy array) and its
pixel size in nm (None if unknown: sizes then come out in px):

* Gatan DM (Python in DM):   img = DM.GetFrontImage(); a = img.GetNumArray()
                             px = img.GetDimensionScale(0) (x the unit: µm -> * 1000)
* SerialEM:                  a = np.asarray(sem.bufferImage("A")); px = sem.ReportCurrentPixelSize("A")
* Velox / AutoScript:        a = microscope.acquisition.acquire_camera_image(...).data
                             px = image.metadata.binary_result.pixel_size.x * 1e9
"""

import sys

import numpy as np

from nanoscout.clients.acquisition.publisher import FramePublisher


def acquire(k: int) -> tuple[np.ndarray, float | None]:
    """Stand-in camera: a 512 x 512 uint16 frame with bright disks, 0.5 nm/px."""
    yy, xx = np.mgrid[:512, :512]
    img = np.random.default_rng(k).poisson(100, (512, 512)).astype(np.uint16)
    for cy, cx in np.random.default_rng(k).integers(40, 472, (25, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] += 400
    return img, 0.5


endpoint = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
frames = int(sys.argv[2]) if len(sys.argv) > 2 else 10
results = sys.argv[3] if len(sys.argv) > 3 else None  # the daemon's results: confirm each frame
pub = FramePublisher(endpoint, source="my-camera", results=results)  # push or pub: as it takes
for k in range(frames):
    image, pixel_size_nm = acquire(k)
    pub.send(image, pixel_size_nm=pixel_size_nm, modality="TEM", meta={"file": f"frame-{k}"})
report = pub.close()  # waits for the daemon's answers (lossless, with results)
print(f"{report.describe()} to {endpoint}")
sys.exit(0 if report.complete else 1)
