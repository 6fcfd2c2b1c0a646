/*
 * pyemb: PCI proxies virtio-snd-py-pci, virtio-video-py-pci and
 * virtio-media-py-pci
 *
 * Modern-only (virtio 1.x) like QEMU's virtio-sound-pci: device IDs 25, 30,
 * 31 and 48 have no legacy interface.  The virtio device's properties
 * (backend, config, role, shm-size) are aliased onto the proxy.
 *
 * A device with a shared memory region (virtio-media-py, shm-size > 0)
 * lays its BARs out as virtio-gpu-pci does for hostmem: MSI-X in BAR 1,
 * the virtio registers in BAR 2, the region in BAR 4 (64-bit,
 * prefetchable), described by a VIRTIO_PCI_CAP_SHARED_MEMORY_CFG
 * capability.
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

/* The proxies share this layout; they differ in the virtio child type. */
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
    VirtIOPyemb *s = &dev->vdev;

    /* Before the device's realize: the BAR and cap exist before it plugs. */
    if (!pyemb_shm_create(s, errp)) {
        return;
    }
    if (s->shm) {
        vpci_dev->msix_bar_idx = 1;
        vpci_dev->modern_mem_bar_idx = 2;
        pci_register_bar(&vpci_dev->pci_dev, 4,
                         PCI_BASE_ADDRESS_SPACE_MEMORY |
                         PCI_BASE_ADDRESS_MEM_PREFETCH |
                         PCI_BASE_ADDRESS_MEM_TYPE_64,
                         &s->shm_mr);
        virtio_pci_add_shm_cap(vpci_dev, 4, 0, s->shm->size, PYEMB_SHM_ID);
    }
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

/* The proxy types, and what sets them apart; found by type name. */
typedef struct PyembPCIType {
    VirtioPCIDeviceTypeInfo info;
    const char *vdev_type;
    uint16_t class_id;
} PyembPCIType;

static void virtio_pyemb_pci_type_class_init(ObjectClass *klass, void *data);
static void virtio_pyemb_pci_instance_init(Object *obj);

#define PYEMB_PCI_TYPE(name_, vdev_type_, class_id_) {      \
        .info = {                                           \
            .generic_name = name_,                          \
            .instance_size = sizeof(VirtIOPyembPCI),        \
            .instance_init = virtio_pyemb_pci_instance_init, \
            .class_init = virtio_pyemb_pci_type_class_init, \
        },                                                  \
        .vdev_type = vdev_type_,                            \
        .class_id = class_id_,                              \
    }

static const PyembPCIType pyemb_pci_types[] = {
    PYEMB_PCI_TYPE("virtio-snd-py-pci", TYPE_VIRTIO_SND_PY,
                   PCI_CLASS_MULTIMEDIA_AUDIO),
    PYEMB_PCI_TYPE("virtio-video-py-pci", TYPE_VIRTIO_VIDEO_PY,
                   PCI_CLASS_MULTIMEDIA_VIDEO),
    PYEMB_PCI_TYPE("virtio-media-py-pci", TYPE_VIRTIO_MEDIA_PY,
                   PCI_CLASS_MULTIMEDIA_VIDEO),
};

static const PyembPCIType *pyemb_pci_type(const char *name)
{
    for (size_t i = 0; i < ARRAY_SIZE(pyemb_pci_types); i++) {
        if (!strcmp(pyemb_pci_types[i].info.generic_name, name)) {
            return &pyemb_pci_types[i];
        }
    }
    g_assert_not_reached();
}

/* Description and categories are the virtio device's. */
static void virtio_pyemb_pci_type_class_init(ObjectClass *klass, void *data)
{
    const PyembPCIType *t = pyemb_pci_type(object_class_get_name(klass));
    DeviceClass *dc = DEVICE_CLASS(klass);
    DeviceClass *vdc = DEVICE_CLASS(object_class_by_name(t->vdev_type));

    virtio_pyemb_pci_class_init(klass, data);
    dc->desc = vdc->desc;
    bitmap_or(dc->categories, dc->categories, vdc->categories,
              DEVICE_CATEGORY_MAX);
    PCI_DEVICE_CLASS(klass)->class_id = t->class_id;
}

static void virtio_pyemb_pci_instance_init(Object *obj)
{
    const PyembPCIType *t = pyemb_pci_type(object_get_typename(obj));
    VirtIOPyembPCI *dev = to_pyemb_pci(obj);

    virtio_instance_init_common(obj, &dev->vdev, sizeof(dev->vdev),
                                t->vdev_type);
}

static void virtio_pyemb_pci_register(void)
{
    for (size_t i = 0; i < ARRAY_SIZE(pyemb_pci_types); i++) {
        virtio_pci_types_register(&pyemb_pci_types[i].info);
    }
}

type_init(virtio_pyemb_pci_register)
module_obj("virtio-snd-py-pci");
module_obj("virtio-video-py-pci");
module_obj("virtio-media-py-pci");
module_kconfig(VIRTIO_PCI);
