/*
 * pyemb: PCI proxies virtio-snd-py-pci and virtio-video-py-pci
 *
 * Modern-only (virtio 1.x) like QEMU's virtio-sound-pci: device IDs 25, 30
 * and 31 have no legacy interface.  The virtio device's properties
 * (backend, config, role) are aliased onto the proxy.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "pyemb-internal.h"
#include "hw/pci/pci.h"
#include "hw/qdev-properties.h"
#include "hw/virtio/virtio-pci.h"
#include "qapi/error.h"
#include "qemu/module.h"

/* Both proxies share this layout; they differ in the virtio child type. */
typedef struct VirtIOPyembPCI {
    VirtIOPCIProxy parent_obj;
    VirtIOPyemb vdev;
} VirtIOPyembPCI;

static VirtIOPyembPCI *to_pyemb_pci(Object *obj)
{
    return container_of(VIRTIO_PCI(obj), VirtIOPyembPCI, parent_obj);
}

/* Enough MSI-X vectors for one per queue (up to 8) plus config changes. */
static const Property virtio_pyemb_pci_properties[] = {
    DEFINE_PROP_BIT("ioeventfd", VirtIOPCIProxy, flags,
                    VIRTIO_PCI_FLAG_USE_IOEVENTFD_BIT, true),
    DEFINE_PROP_UINT32("vectors", VirtIOPCIProxy, nvectors, 9),
};

static void virtio_pyemb_pci_realize(VirtIOPCIProxy *vpci_dev, Error **errp)
{
    VirtIOPyembPCI *dev = to_pyemb_pci(OBJECT(vpci_dev));

    virtio_pci_force_virtio_1(vpci_dev);
    qdev_realize(DEVICE(&dev->vdev), BUS(&vpci_dev->bus), errp);
}

static void virtio_pyemb_pci_class_init(ObjectClass *klass, void *data)
{
    DeviceClass *dc = DEVICE_CLASS(klass);
    VirtioPCIClass *vpciklass = VIRTIO_PCI_CLASS(klass);

    device_class_set_props(dc, virtio_pyemb_pci_properties);
    vpciklass->realize = virtio_pyemb_pci_realize;
}

static void virtio_snd_py_pci_class_init(ObjectClass *klass, void *data)
{
    DeviceClass *dc = DEVICE_CLASS(klass);
    PCIDeviceClass *pcidevklass = PCI_DEVICE_CLASS(klass);

    virtio_pyemb_pci_class_init(klass, data);
    dc->desc = "pyemb virtio sound device (Python device model)";
    set_bit(DEVICE_CATEGORY_SOUND, dc->categories);
    pcidevklass->class_id = PCI_CLASS_MULTIMEDIA_AUDIO;
}

static void virtio_video_py_pci_class_init(ObjectClass *klass, void *data)
{
    DeviceClass *dc = DEVICE_CLASS(klass);
    PCIDeviceClass *pcidevklass = PCI_DEVICE_CLASS(klass);

    virtio_pyemb_pci_class_init(klass, data);
    dc->desc = "pyemb virtio video decoder/encoder (Python device model)";
    set_bit(DEVICE_CATEGORY_MISC, dc->categories);
    pcidevklass->class_id = PCI_CLASS_MULTIMEDIA_VIDEO;
}

static void virtio_snd_py_pci_instance_init(Object *obj)
{
    VirtIOPyembPCI *dev = to_pyemb_pci(obj);

    virtio_instance_init_common(obj, &dev->vdev, sizeof(dev->vdev),
                                TYPE_VIRTIO_SND_PY);
}

static void virtio_video_py_pci_instance_init(Object *obj)
{
    VirtIOPyembPCI *dev = to_pyemb_pci(obj);

    virtio_instance_init_common(obj, &dev->vdev, sizeof(dev->vdev),
                                TYPE_VIRTIO_VIDEO_PY);
}

static const VirtioPCIDeviceTypeInfo virtio_snd_py_pci_info = {
    .generic_name = "virtio-snd-py-pci",
    .instance_size = sizeof(VirtIOPyembPCI),
    .instance_init = virtio_snd_py_pci_instance_init,
    .class_init = virtio_snd_py_pci_class_init,
};

static const VirtioPCIDeviceTypeInfo virtio_video_py_pci_info = {
    .generic_name = "virtio-video-py-pci",
    .instance_size = sizeof(VirtIOPyembPCI),
    .instance_init = virtio_video_py_pci_instance_init,
    .class_init = virtio_video_py_pci_class_init,
};

static void virtio_pyemb_pci_register(void)
{
    virtio_pci_types_register(&virtio_snd_py_pci_info);
    virtio_pci_types_register(&virtio_video_py_pci_info);
}

type_init(virtio_pyemb_pci_register)
module_obj("virtio-snd-py-pci");
module_obj("virtio-video-py-pci");
module_kconfig(VIRTIO_PCI);
